# The demo's dense model on the default multidomain data (byte-level), CPU-sized.
# python train.py config/dense_small.py
out_dir = "out/dense_small"
dataset = "multidomain"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 256
batch_size = 8
max_iters = 600
eval_interval = 100
eval_iters = 10
warmup_iters = 30
learning_rate = 2e-3
min_lr = 2e-4
