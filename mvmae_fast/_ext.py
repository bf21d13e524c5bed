"""Loads the compiled extension. Importing mvmae_fast never fails because of it: when it is missing
or broken, one warning says what failed and the ``cpp`` backend reports itself unavailable."""

import warnings

try:
    from . import _C
except Exception as err:  # ImportError for a missing module, OSError/ImportError for a bad build
    _C = None
    load_error = f"{type(err).__name__}: {err}"
    warnings.warn(
        f"mvmae_fast._C, the C++/CUDA extension, failed to load ({load_error}). The 'cpp' backend is "
        "unavailable; the 'torch' and 'triton' backends keep working. Rebuild it with `pip install -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    load_error = None


def cuda_compiled() -> bool:
    return _C is not None and bool(_C.cuda_compiled)
