# Lory (arXiv 2405.03133): 8 experts merged per segment of 64 tokens, causal
# segment routing, similarity-based batching (train.py builds the order on first
# use), dense warm-up for the first 5% of steps then upcycled in memory.
include("dense_small.py")
out_dir = "out/lory_8"
moe_layers = "all"
router = "lory"
n_experts = 8
segment_len = 64
batching = "similarity"
max_iters = 400
dense_warmup_iters = 20
