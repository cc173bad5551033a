# Demo stage 2: upcycle the dense checkpoint online into 8 experts top-2
# (config/upcycle_8x2.py: the Llama 3 meets MoE recipe) from the demo's dense run.
include("../upcycle_8x2.py")
out_dir = "out/demo/upcycled"
init_from = "out/demo/dense"
log_interval = 20
