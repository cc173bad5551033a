# Upcycling with softmax-then-topk gates (GShard/Switch order; He et al.): the
# gates sum to about k/E, so the down projections are scaled by E*G^2/k = 4
# ("exact" scaling; exact only with a zero router, which ties every logit).
include("upcycle_8x2.py")
out_dir = "out/upcycle_8x2_softmax_topk"
router = "softmax_topk"
upcycle_weight_scaling = "exact"
router_init_std = 0.0
