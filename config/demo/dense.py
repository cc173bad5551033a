# Demo stage 1: train the dense model that gets upcycled (`make demo`).
include("../dense_small.py")
out_dir = "out/demo/dense"
log_interval = 20
