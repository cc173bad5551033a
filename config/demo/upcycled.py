# Demo stage 2: upcycle the dense checkpoint online into 8 experts top-2
# (Llama 3 meets MoE recipe: topk-then-softmax, every FFN an expert copy,
# a fresh warmup + cosine schedule to a peak a little below the dense peak).
include("../dense_small.py")
out_dir = "out/demo/upcycled"
init_from = "out/demo/dense"
moe_layers = "all"
n_experts = 8
top_k = 2
router = "topk_softmax"
max_iters = 300
eval_interval = 50
log_interval = 20
warmup_iters = 20
learning_rate = 1.5e-3
