# The dense baseline for Lory: same active parameters and steps.
include("dense_small.py")
out_dir = "out/lory_dense_baseline"
max_iters = 400
