"""Session setup for every test and docstring example (``pytest --doctest-modules steer tests``).

Without CUDA, Triton kernels run in Triton's CPU interpreter; the switch has to be set before
Triton is first imported, so it lives here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
