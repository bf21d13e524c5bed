"""Backend selection, per call.

Every op has three backends: ``torch`` (plain PyTorch: the reference and the spec), ``cpp`` (the
compiled extension: CPU threads, and CUDA when built with nvcc) and ``triton``. Unless one is forced,
a call on CUDA tensors takes the first available of triton, cpp, torch, and a call on CPU tensors
cpp, then torch (Triton on the CPU runs only under its interpreter, for tests, and only when forced).

Force a backend with ``MVMAE_FAST_BACKEND=torch|cpp|triton``, with the ``use_backend(name)`` context
manager (which takes priority; ``use_backend(None)`` restores automatic choice), or with an op's
``backend=`` argument. A forced backend that cannot run the given tensors raises
:class:`UnsupportedBackendError` saying why; nothing falls back silently.
"""

import contextlib
import importlib.util
import os

import torch

from . import _ext

BACKENDS = ("torch", "cpp", "triton")
ENV_VAR = "MVMAE_FAST_BACKEND"

# A plain list (not a ContextVar) so torch.compile can read it while tracing and guard on it.
_forced = []
_triton_installed = importlib.util.find_spec("triton") is not None


class UnsupportedBackendError(NotImplementedError):
    """A forced backend cannot run the given inputs; the message lists the reasons."""


def _check_name(name, source):
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")


@contextlib.contextmanager
def use_backend(name):
    """Force backend ``name`` for ops called inside the block (``None``: automatic choice)."""
    if name is not None:
        _check_name(name, "use_backend(name)")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def requested_backend():
    """The forced backend and who forced it, or ``(None, None)``."""
    if _forced:
        return _forced[-1], "use_backend()"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        _check_name(env, ENV_VAR)
        return env, ENV_VAR
    return None, None


def unavailable_reasons(name, device, implemented=BACKENDS):
    """Why backend ``name`` cannot run on ``device`` (empty when it can); ``implemented`` lists the
    backends the op in question has."""
    device = torch.device(device)
    if name not in implemented:
        _check_name(name, "backend")
        return [f"this op has no {name} implementation (it has: {', '.join(implemented)})"]
    if name == "torch":
        return []
    if name == "cpp":
        if _ext._C is None:
            return [f"mvmae_fast._C failed to load ({_ext.load_error})"]
        if device.type == "cpu":
            return []
        if device.type == "cuda":
            if _ext.cuda_compiled():
                return []
            return ["mvmae_fast._C was built without CUDA (nvcc was not found at install time); "
                    "rebuild with `MVMAE_FAST_CUDA=1 pip install -e .`"]
        return [f"the extension has no kernels for {device.type} tensors"]
    if name == "triton":
        if not _triton_installed:
            return ["triton is not installed"]
        if device.type == "cuda":
            return []
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") == "1":
                return []
            return ["Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 "
                    "before importing mvmae_fast (about 1000x slower than native; meant for tests)"]
        return [f"Triton has no backend for {device.type} tensors"]
    _check_name(name, "backend")
    return []


def available_backends(device="cpu", implemented=BACKENDS):
    """Backends (of ``implemented``) that can run on ``device``, in BACKENDS order."""
    return [name for name in BACKENDS if not unavailable_reasons(name, device, implemented)]


def select_backend(op, device, backend="", implemented=BACKENDS):
    """The backend for one call of ``op`` on ``device``; ``backend`` ('' = none) overrides the rest."""
    if backend:
        _check_name(backend, "backend")
        name, source = backend, "backend="
    else:
        name, source = requested_backend()
    if name is not None:
        reasons = unavailable_reasons(name, device, implemented)
        if reasons:
            raise UnsupportedBackendError(
                f"{op}: backend {name!r} (forced by {source}) cannot run on {device} tensors: "
                f"{'; '.join(reasons)}. Backends that can: {', '.join(available_backends(device, implemented))}."
            )
        return name
    order = ("triton", "cpp") if torch.device(device).type == "cuda" else ("cpp",)
    for candidate in order:
        if not unavailable_reasons(candidate, device, implemented):
            return candidate
    return "torch"
