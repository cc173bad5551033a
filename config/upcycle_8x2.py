# Online upcycling (Llama 3 meets MoE): the dense_small checkpoint -> 8 experts,
# top-2, topk-then-softmax gates (exactly function-preserving), fresh warmup +
# cosine to a peak a little below the dense peak. Train the dense model first:
#   python train.py config/dense_small.py && python train.py config/upcycle_8x2.py
include("dense_small.py")
init_from = "out/dense_small"
out_dir = "out/upcycle_8x2"
moe_layers = "all"
n_experts = 8
top_k = 2
router = "topk_softmax"
max_iters = 300
eval_interval = 50
warmup_iters = 20
learning_rate = 1.5e-3
