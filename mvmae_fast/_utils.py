"""Argument checks and output allocation shared by the ops."""

import contextlib
import math
import os

import torch

# Debug aid for tests: fill every op output with garbage before a kernel writes it, so an element
# a kernel forgets to write fails the comparison instead of passing by luck.
POISON_OUTPUTS = os.environ.get("MVMAE_FAST_POISON") == "1"


def new_output(shape, dtype, device):
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(math.nan if dtype.is_floating_point else -7)
    return out


# dtype codes of the extension's CPU kernels (CpuDtype in csrc/cpu/simd.h).
CPP_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def direct_kernel_calls(*tensors):
    """Whether an op may call its kernel directly from an autograd.Function in eager mode instead of
    through its custom op (which costs ~50-100 us of Python dispatch per call): plain torch.Tensor (or
    nn.Parameter) arguments, nothing tracing (torch.compile / export, jit.trace), no functorch
    transform and no TorchDispatchMode active. Otherwise the custom op runs, which all of those
    understand."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None or torch._C._len_torch_dispatch_stack():
        return False
    return all(type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in tensors)


def eager_function(name, kernel, setup_context, backward, backend, setup_args=None):
    """An autograd.Function (named ``name``) that runs a custom op's work in eager mode without the
    op's Python dispatch: ``kernel(*args)`` forward, then the op's own ``setup_context`` (given
    ``args[:setup_args]`` plus check_indices=False and ``backend``, the op's trailing arguments) and
    its registered ``backward``, which sees ``ctx.direct`` (see direct_backward). The callers check
    the arguments and indices first, as the op would."""

    def forward(ctx, *args):
        out = kernel(*args)
        setup_context(ctx, (*args[:setup_args], False, backend), out)
        ctx.direct, ctx.num_args = True, len(args)
        return out

    def function_backward(ctx, grad):
        return backward(ctx, grad)[:ctx.num_args]

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(function_backward)})


def direct_backward(ctx):
    """Whether an op's registered backward may call its partner kernel directly: the node was made by
    the op's eager autograd Function (which sets ``ctx.direct``) and this backward is not itself being
    differentiated (create_graph), which needs the partner custom op and its own backward."""
    return getattr(ctx, "direct", False) and not torch.is_grad_enabled()


def check_int(name, value, minimum=None, maximum=None):
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def check_tensor(name, value, ndim, dtypes, layout):
    """Type, rank and dtype of a tensor argument; ``layout`` names the dims for the message."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}; got {value.dtype}")


def check_same_device(ref_name, ref, **tensors):
    """Every one of ``tensors`` (by argument name) on ``ref``'s device."""
    for name, t in tensors.items():
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_index_values(name, ids, num_rows, unique=True, rule="be unique within each sample"):
    """Index values in [0, num_rows) and, when ``unique``, no repeats within a row (a device sync on
    CUDA: callers skip it for indices they made themselves)."""
    low, high = (int(v) for v in torch.aminmax(ids))
    if low < 0 or high >= num_rows:
        raise ValueError(f"{name} must lie in [0, {num_rows}); found values from {low} to {high}")
    if unique and ids.shape[1] > 1:
        ordered = ids.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        if bool(repeated.any()):
            row = int(repeated.nonzero()[0, 0])
            raise ValueError(f"{name} must {rule}; sample {row} repeats an index")


def cuda_stream(device):
    return torch.cuda.current_stream(device).cuda_stream


def device_guard(device):
    """Makes ``device`` current for launches that use the current CUDA device (Triton, the extension)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
