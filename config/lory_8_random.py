# Lory with random document order (the batching ablation).
include("lory_8.py")
out_dir = "out/lory_8_random"
batching = "random"
