# A small MoE trained from scratch: the dense_small shape with every FFN
# replaced by 8 experts, top-2 (Mixtral-style topk-then-softmax gates).
# python train.py config/moe_small.py
include("dense_small.py")
out_dir = "out/moe_small"
moe_layers = "all"
n_experts = 8
top_k = 2
router = "topk_softmax"
capacity_factor = 0.0        # dropless
aux_loss = "switch"
aux_loss_coef = 1e-2
z_loss_coef = 1e-3
