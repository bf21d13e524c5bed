"""mvmae_fast: fast MAE and MV-MAE pretraining for Vision Transformers.

Ops live in :mod:`mvmae_fast.ops`; each has a plain-PyTorch reference (backend ``torch``), the
C++/CUDA extension (``cpp``) and Triton kernels (``triton``). See :mod:`mvmae_fast.backends` for how
a backend is chosen per call and how to force one.
"""

__version__ = "0.1.0"

from . import ops
from .backends import BACKENDS, UnsupportedBackendError, available_backends, use_backend

__all__ = ["BACKENDS", "UnsupportedBackendError", "available_backends", "ops", "use_backend"]
