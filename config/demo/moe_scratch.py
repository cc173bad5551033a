# Demo stage 3: the same MoE shape trained from scratch for the same extra steps.
include("upcycled.py")
out_dir = "out/demo/moe_scratch"
init_from = "scratch"
learning_rate = 2e-3
warmup_iters = 30
