"""Test-session setup shared by all test files.

Triton's CPU interpreter: without a CUDA GPU the Triton expert kernels can still be
checked for correctness by running them in the interpreter. TRITON_INTERPRET must be
set before kernels._triton_kernels() first runs (it is read when the kernels are
defined), so it is set here, before any test module is imported. With a GPU nothing
is set and the same tests run the compiled kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
