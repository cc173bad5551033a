# Base of every experiment run (experiments.py adds the per-run settings):
# the dense_small shape on the default multidomain data.
include("../dense_small.py")
log_interval = 20
eval_iters = 10
