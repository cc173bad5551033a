# Fine-grained upcycling (He et al., virtual group init): each dense FFN is split
# into G=2 shards of width d_ff/2, each replicated E'=4 times -> 8 experts, top-2
# picks one whole virtual group; down projections scaled by G (exact).
include("upcycle_8x2.py")
out_dir = "out/upcycle_fine_e4g2"
upcycle_granularity = 2
upcycle_weight_scaling = "exact"
