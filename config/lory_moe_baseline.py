# The token-choice baseline for Lory: same total parameters (8 experts), top-2.
include("moe_small.py")
out_dir = "out/lory_moe_baseline"
max_iters = 400
