# Demo stage 4: keep training the dense model for the same extra steps, with the
# same warm-restart schedule as the upcycled run (the compute-matched baseline).
include("upcycled.py")
out_dir = "out/demo/dense_continued"
moe_layers = "none"
