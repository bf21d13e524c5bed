"""Tests for mvmae_fast.ops.gather_rows / scatter_rows (all backends, CPU)."""

import json
import os
import sys
import textwrap

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mvmae_fast  # noqa: E402
from mvmae_fast import ops  # noqa: E402

from mvmae_helpers import (  # noqa: E402
    param_id,
    BACKENDS,
    assert_bitwise_equal,
    check_gather,
    check_gather_grad,
    check_roundtrip,
    check_scatter,
    check_scatter_grad,
    check_with_masking,
    make_ids,
    make_noncontig,
    make_x,
    ref_gather,
    ref_scatter,
    run_python,
)

SHAPES = [(2, 197, 49, 61), (3, 50, 1, 64), (2, 50, 50, 17), (1, 197, 196, 8), (2, 1, 1, 3)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDX_DTYPES = [torch.int32, torch.int64]


# --------------------------------------------------------------------------- #
# forward correctness
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", SHAPES, ids=param_id)
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=param_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gather(backend, dtype, idx_dtype, shape):
    check_gather(backend, dtype, idx_dtype, *shape)


@pytest.mark.parametrize("shape", SHAPES, ids=param_id)
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=param_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter(backend, dtype, idx_dtype, shape):
    check_scatter(backend, dtype, idx_dtype, *shape)


EXTRA_SHAPES = [(2, 9, 4, 1), (1, 6, 3, 700), (2, 33, 7, 129), (1, 4, 2, 1100)]  # D > kernel blocks


@pytest.mark.parametrize("shape", EXTRA_SHAPES, ids=param_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=param_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_extra_shapes_and_float64(backend, dtype, shape):
    check_gather(backend, dtype, torch.int64, *shape)
    check_scatter(backend, dtype, torch.int32, *shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_large_vit_base_shape(backend, dtype):
    """B=8, L=197, K=49, D=768 (ViT-B); too slow for the Triton interpreter."""
    check_gather(backend, dtype, torch.int64, 8, 197, 49, 768)
    check_scatter(backend, dtype, torch.int64, 8, 197, 49, 768)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_indices_false_same_result(backend):
    check_gather(backend, torch.float32, torch.int64, 2, 50, 12, 16, check_indices=False)
    check_scatter(backend, torch.float32, torch.int32, 2, 50, 12, 16, check_indices=False)


@pytest.mark.parametrize("backend", [None] + list(BACKENDS))
def test_automatic_and_forced_backends_agree(backend):
    x = make_x((2, 50, 16), torch.float32)
    ids = make_ids(2, 50, 12)
    assert_bitwise_equal(ops.gather_rows(x, ids, backend=backend), ref_gather(x, ids))
    y = make_x((2, 12, 16), torch.float32)
    assert_bitwise_equal(ops.scatter_rows(y, ids, 50, backend=backend), ref_scatter(y, ids, 50))


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_values_copied_bitwise(backend):
    """A copy must preserve inf, -inf, -0.0, NaN and subnormals bit for bit."""
    B, L, K, D = 2, 12, 5, 8
    x = make_x((B, L, D), torch.float32)
    specials = torch.tensor([float("inf"), float("-inf"), -0.0, float("nan"), 1e-45, -1e-40, 3.4e38, 0.0])
    x[:, ::2, :] = specials  # every even row full of special values
    ids = make_ids(B, L, K, seed=3)
    assert_bitwise_equal(ops.gather_rows(x, ids, backend=backend), ref_gather(x, ids), "gather specials")
    y = x[:, :K].contiguous()
    assert_bitwise_equal(ops.scatter_rows(y, ids, L, backend=backend), ref_scatter(y, ids, L), "scatter specials")


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_match_python_api(backend):
    x = make_x((2, 20, 8), torch.float32)
    ids = make_ids(2, 20, 6)
    for b in ("", backend):
        assert_bitwise_equal(torch.ops.mvmae_fast.gather_rows(x, ids, True, b), ref_gather(x, ids), f"op gather {b!r}")
        y = x[:, :6].contiguous()
        assert_bitwise_equal(
            torch.ops.mvmae_fast.scatter_rows(y, ids, 20, True, b), ref_scatter(y, ids, 20), f"op scatter {b!r}"
        )


def test_outputs_do_not_alias_inputs():
    x = make_x((2, 5, 3), torch.float32)
    ids = torch.arange(5).expand(2, 5).contiguous()  # identity gather
    for backend in BACKENDS:
        out = ops.gather_rows(x, ids, backend=backend)
        assert out.data_ptr() != x.data_ptr()
        out.zero_()
        assert not torch.equal(x, out), f"{backend}: identity gather returned a view of x"
        back = ops.scatter_rows(x, ids, 5, backend=backend)
        back.zero_()
        assert not torch.equal(x, back), f"{backend}: identity scatter returned a view of y"


# --------------------------------------------------------------------------- #
# gradients
# --------------------------------------------------------------------------- #
GRAD_SHAPES = [(2, 50, 12, 16), (3, 197, 49, 8), (2, 1, 1, 3)]


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=param_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=param_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_backward(backend, idx_dtype, dtype, shape):
    check_gather_grad(backend, dtype, idx_dtype, *shape)


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=param_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=param_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_backward(backend, idx_dtype, dtype, shape):
    check_scatter_grad(backend, dtype, idx_dtype, *shape)


@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck],
                         ids=["gradcheck", "gradgradcheck"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck(backend, check):
    """gradgradcheck: backward of gather is scatter (and vice versa), itself differentiable."""
    x = make_x((2, 6, 3), torch.float64).requires_grad_()
    y = make_x((2, 4, 3), torch.float64).requires_grad_()
    ids = make_ids(2, 6, 4, seed=9)
    assert check(lambda t: ops.gather_rows(t, ids, backend=backend), (x,))
    assert check(lambda t: ops.scatter_rows(t, ids, 6, backend=backend), (y,))


# --------------------------------------------------------------------------- #
# round trip and use together with random_masking
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_roundtrip(backend, dtype):
    check_roundtrip(backend, dtype, 3, 197, 49, 16)
    check_roundtrip(backend, dtype, 2, 50, 50, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_with_random_masking(backend, dtype):
    check_with_masking(backend, dtype, 3, 197, 49, 24, seed=5)
    check_with_masking(backend, dtype, 2, 16, 16, 8, seed=6)


# --------------------------------------------------------------------------- #
# non-contiguous inputs
# --------------------------------------------------------------------------- #
X_KINDS = ["transposed", "last_dim_strided", "rows_strided", "batch_strided", "expanded_batch", "offset"]
ID_KINDS = ["contiguous", "transposed", "rows_strided", "expanded_batch", "offset"]


def _maybe_noncontig(t, kind):
    return t if kind == "contiguous" else make_noncontig(t, kind)


@pytest.mark.parametrize("ids_kind", ID_KINDS)
@pytest.mark.parametrize("x_kind", X_KINDS + ["contiguous"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_noncontiguous(backend, x_kind, ids_kind):
    B, L, K, D = 3, 20, 7, 10
    x = _maybe_noncontig(make_x((B, L, D), torch.float32), x_kind)
    ids = _maybe_noncontig(make_ids(B, L, K, seed=4), ids_kind)
    if x_kind != "contiguous":
        assert not x.is_contiguous() or x_kind == "offset"
    out = ops.gather_rows(x, ids, backend=backend)
    assert_bitwise_equal(out, ref_gather(x.contiguous(), ids.contiguous()), f"gather x={x_kind} ids={ids_kind}")


@pytest.mark.parametrize("ids_kind", ID_KINDS)
@pytest.mark.parametrize("y_kind", X_KINDS + ["contiguous"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_noncontiguous(backend, y_kind, ids_kind):
    B, L, K, D = 3, 20, 7, 10
    y = _maybe_noncontig(make_x((B, K, D), torch.float32), y_kind)
    ids = _maybe_noncontig(make_ids(B, L, K, seed=4), ids_kind)
    out = ops.scatter_rows(y, ids, L, backend=backend)
    assert_bitwise_equal(out, ref_scatter(y.contiguous(), ids.contiguous(), L), f"scatter y={y_kind} ids={ids_kind}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_grad(backend):
    B, L, K, D = 2, 20, 7, 10
    base = make_x((B, D, L), torch.float32).requires_grad_()
    x = base.transpose(1, 2)
    ids = make_noncontig(make_ids(B, L, K, seed=4), "transposed")
    g = make_noncontig(make_x((B, K, D), torch.float32, seed=8), "transposed")
    ops.gather_rows(x, ids, backend=backend).backward(g)
    assert_bitwise_equal(base.grad, ref_scatter(g.contiguous(), ids, L).transpose(1, 2), "non-contiguous x.grad")


# --------------------------------------------------------------------------- #
# backend selection
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("backend", BACKENDS)
def test_use_backend_context_manager(backend):
    x = make_x((2, 30, 8), torch.float32)
    ids = make_ids(2, 30, 9)
    with mvmae_fast.use_backend(backend):
        out = ops.gather_rows(x, ids)
        res = ops.random_masking(2, 30, 9, seed=1)
    assert_bitwise_equal(out, ref_gather(x, ids))
    assert_bitwise_equal(res.ids_keep, ops.random_masking(2, 30, 9, seed=1, backend="torch").ids_keep)


def test_use_backend_none():
    x = make_x((2, 30, 8), torch.float32)
    ids = make_ids(2, 30, 9)
    with mvmae_fast.use_backend(None):
        assert_bitwise_equal(ops.gather_rows(x, ids), ref_gather(x, ids))


@pytest.mark.parametrize("backend", BACKENDS)
def test_env_backend(backend, monkeypatch):
    monkeypatch.setenv("MVMAE_FAST_BACKEND", backend)
    x = make_x((2, 30, 8), torch.float32)
    ids = make_ids(2, 30, 9)
    assert_bitwise_equal(ops.gather_rows(x, ids), ref_gather(x, ids))
    y = x[:, :9].contiguous()
    assert_bitwise_equal(ops.scatter_rows(y, ids, 30), ref_scatter(y, ids, 30))


@pytest.mark.parametrize("name", ["cuda", "nope", "TORCH ", "cpu"])
def test_use_backend_invalid_name(name):
    x = make_x((2, 30, 8), torch.float32)
    ids = make_ids(2, 30, 9)
    with pytest.raises(ValueError):
        with mvmae_fast.use_backend(name):
            ops.gather_rows(x, ids)


def test_env_backend_invalid_name(monkeypatch):
    monkeypatch.setenv("MVMAE_FAST_BACKEND", "nope")
    x = make_x((2, 30, 8), torch.float32)
    ids = make_ids(2, 30, 9)
    with pytest.raises(ValueError, match="MVMAE_FAST_BACKEND"):
        ops.gather_rows(x, ids)
    with pytest.raises(ValueError, match="MVMAE_FAST_BACKEND"):
        ops.scatter_rows(x[:, :9], ids, 30)
    with pytest.raises(ValueError, match="MVMAE_FAST_BACKEND"):
        ops.random_masking(2, 30, 9, seed=0)


def test_backend_kwarg_invalid_name():
    x = make_x((2, 30, 8), torch.float32)
    ids = make_ids(2, 30, 9)
    with pytest.raises(ValueError):
        ops.gather_rows(x, ids, backend="nope")


_SUBPROCESS_PRELUDE = textwrap.dedent(
    """
    import json, os, sys, traceback, warnings
    RESULTS = {}

    def record(key, fn):
        try:
            value = fn()
            RESULTS[key] = {"ok": True, "value": value}
        except BaseException as e:  # noqa
            RESULTS[key] = {
                "ok": False,
                "type": type(e).__name__,
                "mro": [c.__name__ for c in type(e).__mro__],
                "msg": str(e),
                "tb": traceback.format_exc()[-2000:],
            }
    """
)

_NO_INTERPRET_SCRIPT = _SUBPROCESS_PRELUDE + textwrap.dedent(
    """
    import torch
    import mvmae_fast
    from mvmae_fast import ops
    x = torch.randn(2, 10, 4)
    ids = torch.tensor([[1, 3, 5], [0, 2, 9]])
    ref = x[torch.arange(2)[:, None], ids]

    def gather_ok():
        return bool(torch.equal(ops.gather_rows(x, ids), ref))

    def in_ctx(name, fn):
        def run():
            with mvmae_fast.use_backend(name):
                return fn()
        return run

    record("available", lambda: list(mvmae_fast.available_backends("cpu")))
    record("kwarg_triton", lambda: ops.gather_rows(x, ids, backend="triton") is None)
    record("ctx_triton", in_ctx("triton", gather_ok))
    record("after_ctx", gather_ok)
    record("ctx_triton_scatter", in_ctx("triton", lambda: ops.scatter_rows(ref, ids, 10) is None))
    record("ctx_triton_masking", in_ctx("triton", lambda: ops.random_masking(2, 10, 3, seed=0) is None))
    os.environ["MVMAE_FAST_BACKEND"] = "triton"   # set after import: must be read at call time
    record("env_triton", gather_ok)
    record("ctx_overrides_env", in_ctx("torch", gather_ok))
    del os.environ["MVMAE_FAST_BACKEND"]
    record("env_removed", gather_ok)
    print("RESULTS=" + json.dumps(RESULTS))
    """
)


def _parse_results(proc):
    assert proc.returncode == 0, f"subprocess failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS=")]
    assert lines, f"no RESULTS line:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULTS="):])


@pytest.fixture(scope="module")
def no_interpret_results():
    proc = run_python(_NO_INTERPRET_SCRIPT, env_remove=("TRITON_INTERPRET", "MVMAE_FAST_BACKEND"))
    return _parse_results(proc)


def _assert_unsupported(r, needle):
    assert not r["ok"], f"expected UnsupportedBackendError, got success: {r}"
    assert "UnsupportedBackendError" in r["mro"], f"expected UnsupportedBackendError, got {r['type']}: {r['msg']}"
    assert "NotImplementedError" in r["mro"]
    assert needle in r["msg"], f"message does not mention {needle!r}: {r['msg']!r}"


def test_no_interpreter_available_backends(no_interpret_results):
    r = no_interpret_results["available"]
    assert r["ok"], r
    assert "triton" not in r["value"] and "torch" in r["value"], r["value"]


@pytest.mark.parametrize("key", ["kwarg_triton", "ctx_triton", "ctx_triton_scatter", "ctx_triton_masking", "env_triton"])
def test_no_interpreter_forcing_triton_raises(no_interpret_results, key):
    _assert_unsupported(no_interpret_results[key], "TRITON_INTERPRET")


@pytest.mark.parametrize("key", ["after_ctx", "ctx_overrides_env", "env_removed"])
def test_no_interpreter_other_calls_work(no_interpret_results, key):
    r = no_interpret_results[key]
    assert r["ok"] and r["value"] is True, r


_NO_EXTENSION_SCRIPT = _SUBPROCESS_PRELUDE + textwrap.dedent(
    """
    sys.modules["mvmae_fast._C"] = None   # makes `import mvmae_fast._C` raise ImportError
    import torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import mvmae_fast
        from mvmae_fast import ops
    RESULTS["import_warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]

    x = torch.randn(2, 10, 4)
    ids = torch.tensor([[1, 3, 5], [0, 2, 9]])
    ref = x[torch.arange(2)[:, None], ids]

    def in_ctx(name, fn):
        def run():
            with mvmae_fast.use_backend(name):
                return fn()
        return run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record("gather_default", lambda: bool(torch.equal(ops.gather_rows(x, ids), ref)))
        record("scatter_default", lambda: bool(torch.equal(ops.scatter_rows(ref, ids, 10)[0, 3], x[0, 3])))
        record("masking_default", lambda: ops.random_masking(2, 10, 3, seed=4).ids_keep.tolist()
               == ops.random_masking(2, 10, 3, seed=4, backend="torch").ids_keep.tolist())
    RESULTS["call_warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
    record("available", lambda: list(mvmae_fast.available_backends("cpu")))
    record("kwarg_cpp", lambda: ops.gather_rows(x, ids, backend="cpp") is None)
    record("ctx_cpp", in_ctx("cpp", lambda: ops.gather_rows(x, ids) is None))
    record("ctx_cpp_masking", in_ctx("cpp", lambda: ops.random_masking(2, 10, 3, seed=0) is None))
    record("ctx_cpp_scatter", in_ctx("cpp", lambda: ops.scatter_rows(ref, ids, 10) is None))
    print("RESULTS=" + json.dumps(RESULTS))
    """
)


@pytest.fixture(scope="module")
def no_extension_results():
    proc = run_python(_NO_EXTENSION_SCRIPT, env_remove=("MVMAE_FAST_BACKEND",))
    return _parse_results(proc)


def test_no_extension_warns_once(no_extension_results):
    ws = no_extension_results["import_warnings"]
    mentioning = [w for w in ws if "mvmae_fast._C" in w]
    assert len(mentioning) == 1, f"expected exactly one warning mentioning mvmae_fast._C at import, got {ws}"
    later = [w for w in no_extension_results["call_warnings"] if "_C" in w]
    assert not later, f"further warnings about the extension when calling ops: {later}"


@pytest.mark.parametrize("key", ["gather_default", "scatter_default", "masking_default"])
def test_no_extension_default_calls_work(no_extension_results, key):
    r = no_extension_results[key]
    assert r["ok"] and r["value"] is True, r


def test_no_extension_available_backends(no_extension_results):
    r = no_extension_results["available"]
    assert r["ok"], r
    assert "cpp" not in r["value"] and "torch" in r["value"], r["value"]


@pytest.mark.parametrize("key", ["kwarg_cpp", "ctx_cpp", "ctx_cpp_masking", "ctx_cpp_scatter"])
def test_no_extension_forcing_cpp_raises(no_extension_results, key):
    _assert_unsupported(no_extension_results[key], "_C")


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #
B_, L_, K_, D_ = 2, 10, 3, 4
VE_TE = (ValueError, TypeError)


def _x(dtype=torch.float32, shape=(B_, L_, D_)):
    return torch.ones(shape, dtype=dtype) if not dtype.is_floating_point else make_x(shape, dtype)


def _ids(dtype=torch.int64, device="cpu"):
    if device == "meta":
        return torch.empty((B_, K_), dtype=dtype, device="meta")
    return torch.tensor([[1, 4, 7], [0, 9, 2]]).to(dtype)


def _ids_with(values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype)


# (case id, structural?, callable(backend, check_indices), expected exception types, regex for the message)
GATHER_BAD = [
    ("x_2d", True, lambda b, c: ops.gather_rows(_x(shape=(L_, D_)), _ids(), check_indices=c, backend=b), VE_TE, r"\bx\b"),
    ("x_4d", True, lambda b, c: ops.gather_rows(_x(shape=(B_, L_, D_, 1)), _ids(), check_indices=c, backend=b), VE_TE, r"\bx\b"),
    ("ids_1d", True, lambda b, c: ops.gather_rows(_x(), torch.tensor([1, 2, 3]), check_indices=c, backend=b), VE_TE, r"\bids\b"),
    ("ids_3d", True, lambda b, c: ops.gather_rows(_x(), _ids().unsqueeze(-1), check_indices=c, backend=b), VE_TE, r"\bids\b"),
    ("x_int32", True, lambda b, c: ops.gather_rows(_x(torch.int32), _ids(), check_indices=c, backend=b), TypeError, r"\bx\b"),
    ("x_int64", True, lambda b, c: ops.gather_rows(_x(torch.int64), _ids(), check_indices=c, backend=b), TypeError, r"\bx\b"),
    ("x_uint8", True, lambda b, c: ops.gather_rows(_x(torch.uint8), _ids(), check_indices=c, backend=b), TypeError, r"\bx\b"),
    ("x_complex", True, lambda b, c: ops.gather_rows(torch.ones(B_, L_, D_, dtype=torch.complex64), _ids(), check_indices=c, backend=b), VE_TE, r"\bx\b"),
    ("ids_float32", True, lambda b, c: ops.gather_rows(_x(), _ids(torch.float32), check_indices=c, backend=b), TypeError, r"\bids\b"),
    ("ids_float64", True, lambda b, c: ops.gather_rows(_x(), _ids(torch.float64), check_indices=c, backend=b), TypeError, r"\bids\b"),
    ("ids_int16", True, lambda b, c: ops.gather_rows(_x(), _ids(torch.int16), check_indices=c, backend=b), VE_TE, r"\bids\b"),
    ("ids_batch_mismatch", True, lambda b, c: ops.gather_rows(_x(), make_ids(B_ + 1, L_, K_), check_indices=c, backend=b), VE_TE, r"\bids\b"),
    ("ids_meta_device", True, lambda b, c: ops.gather_rows(_x(), _ids(device="meta"), check_indices=c, backend=b), VE_TE, r"\bids\b"),
    ("x_empty_batch", True, lambda b, c: ops.gather_rows(_x(shape=(0, L_, D_)), torch.zeros(0, K_, dtype=torch.int64), check_indices=c, backend=b), ValueError, None),
    ("ids_negative_i64", False, lambda b, c: ops.gather_rows(_x(), _ids_with([[1, -1, 7], [0, 9, 2]]), check_indices=c, backend=b), ValueError, r"\bids\b"),
    ("ids_negative_i32", False, lambda b, c: ops.gather_rows(_x(), _ids_with([[1, 4, 7], [0, 9, -3]], torch.int32), check_indices=c, backend=b), ValueError, r"\bids\b"),
    ("ids_eq_L", False, lambda b, c: ops.gather_rows(_x(), _ids_with([[1, 4, L_], [0, 9, 2]]), check_indices=c, backend=b), ValueError, r"\bids\b"),
    ("ids_huge", False, lambda b, c: ops.gather_rows(_x(), _ids_with([[1, 4, 7], [0, 2**40, 2]]), check_indices=c, backend=b), ValueError, r"\bids\b"),
    ("ids_duplicate", False, lambda b, c: ops.gather_rows(_x(), _ids_with([[1, 4, 7], [2, 9, 2]]), check_indices=c, backend=b), ValueError, r"\bids\b"),
    ("ids_duplicate_i32", False, lambda b, c: ops.gather_rows(_x(), _ids_with([[4, 4, 7], [0, 9, 2]], torch.int32), check_indices=c, backend=b), ValueError, r"\bids\b"),
]


def _y(dtype=torch.float32, shape=(B_, K_, D_)):
    return _x(dtype, shape)


SCATTER_BAD = [
    ("y_2d", True, lambda b, c: ops.scatter_rows(_y(shape=(K_, D_)), _ids(), L_, check_indices=c, backend=b), VE_TE, r"\by\b"),
    ("y_4d", True, lambda b, c: ops.scatter_rows(_y(shape=(B_, K_, D_, 1)), _ids(), L_, check_indices=c, backend=b), VE_TE, r"\by\b"),
    ("ids_1d", True, lambda b, c: ops.scatter_rows(_y(), torch.tensor([1, 2, 3]), L_, check_indices=c, backend=b), VE_TE, r"\bids\b"),
    ("ids_3d", True, lambda b, c: ops.scatter_rows(_y(), _ids().unsqueeze(-1), L_, check_indices=c, backend=b), VE_TE, r"\bids\b"),
    ("y_int32", True, lambda b, c: ops.scatter_rows(_y(torch.int32), _ids(), L_, check_indices=c, backend=b), TypeError, r"\by\b"),
    ("y_int64", True, lambda b, c: ops.scatter_rows(_y(torch.int64), _ids(), L_, check_indices=c, backend=b), TypeError, r"\by\b"),
    ("ids_float32", True, lambda b, c: ops.scatter_rows(_y(), _ids(torch.float32), L_, check_indices=c, backend=b), TypeError, r"\bids\b"),
    ("ids_int16", True, lambda b, c: ops.scatter_rows(_y(), _ids(torch.int16), L_, check_indices=c, backend=b), VE_TE, r"\bids\b"),
    ("ids_batch_mismatch", True, lambda b, c: ops.scatter_rows(_y(), make_ids(B_ + 1, L_, K_), L_, check_indices=c, backend=b), VE_TE, r"\bids\b"),
    ("ids_K_mismatch", True, lambda b, c: ops.scatter_rows(_y(), make_ids(B_, L_, K_ + 1), L_, check_indices=c, backend=b), VE_TE, r"\bids\b|\by\b"),
    ("ids_meta_device", True, lambda b, c: ops.scatter_rows(_y(), _ids(device="meta"), L_, check_indices=c, backend=b), VE_TE, r"\bids\b"),
    ("y_empty_batch", True, lambda b, c: ops.scatter_rows(_y(shape=(0, K_, D_)), torch.zeros(0, K_, dtype=torch.int64), L_, check_indices=c, backend=b), ValueError, None),
    ("K_gt_num_rows", True, lambda b, c: ops.scatter_rows(_y(shape=(B_, 5, D_)), torch.arange(5).expand(B_, 5).contiguous(), 3, check_indices=c, backend=b), VE_TE, r"\bnum_rows\b|\bids\b"),
    ("num_rows_0", True, lambda b, c: ops.scatter_rows(_y(), _ids(), 0, check_indices=c, backend=b), VE_TE, r"\bnum_rows\b"),
    ("num_rows_neg", True, lambda b, c: ops.scatter_rows(_y(), _ids(), -1, check_indices=c, backend=b), VE_TE, r"\bnum_rows\b"),
    ("num_rows_float", True, lambda b, c: ops.scatter_rows(_y(), _ids(), 10.0, check_indices=c, backend=b), VE_TE, r"\bnum_rows\b"),
    ("ids_negative", False, lambda b, c: ops.scatter_rows(_y(), _ids_with([[1, -1, 7], [0, 9, 2]]), L_, check_indices=c, backend=b), ValueError, r"\bids\b"),
    ("ids_eq_num_rows", False, lambda b, c: ops.scatter_rows(_y(), _ids_with([[1, 4, 7], [0, 9, 2]], torch.int32), 9, check_indices=c, backend=b), ValueError, r"\bids\b"),
    ("ids_duplicate", False, lambda b, c: ops.scatter_rows(_y(), _ids_with([[1, 4, 1], [0, 9, 2]]), L_, check_indices=c, backend=b), ValueError, r"\bids\b"),
]

_BAD_BACKENDS = [None] + list(BACKENDS)


def _bad_params(cases):
    params = []
    for case_id, structural, fn, exc, pattern in cases:
        for backend in _BAD_BACKENDS:
            params.append(pytest.param(fn, backend, True, exc, pattern, id=f"{case_id}-{backend}"))
            if structural:  # shape/dtype/device checks must not depend on check_indices
                params.append(pytest.param(fn, backend, False, exc, pattern, id=f"{case_id}-{backend}-nocheck"))
    return params


@pytest.mark.parametrize("fn,backend,check_indices,exc,pattern", _bad_params(GATHER_BAD))
def test_gather_bad_input(fn, backend, check_indices, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn(backend, check_indices)


@pytest.mark.parametrize("fn,backend,check_indices,exc,pattern", _bad_params(SCATTER_BAD))
def test_scatter_bad_input(fn, backend, check_indices, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn(backend, check_indices)


# --------------------------------------------------------------------------- #
# torch.library.opcheck and torch.compile
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_gather(backend):
    x = make_x((2, 12, 8), torch.float32).requires_grad_()
    ids = make_ids(2, 12, 5)
    torch.library.opcheck(torch.ops.mvmae_fast.gather_rows.default, (x, ids, True, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_scatter(backend):
    y = make_x((2, 5, 8), torch.float32).requires_grad_()
    ids = make_ids(2, 12, 5)
    torch.library.opcheck(torch.ops.mvmae_fast.scatter_rows.default, (y, ids, 12, True, backend))


def test_torch_compile_fullgraph_gather_backward():
    torch._dynamo.reset()
    B, L, K, D = 2, 20, 6, 8
    ids = make_ids(B, L, K, seed=12)
    w = make_x((B, K, D), torch.float32, seed=13)

    def f(x, ids, w):
        return (ops.gather_rows(x, ids, backend="cpp") * w).sum()

    x_eager = make_x((B, L, D), torch.float32).requires_grad_()
    x_comp = x_eager.detach().clone().requires_grad_()
    loss_eager = f(x_eager, ids, w)
    loss_eager.backward()
    loss_comp = torch.compile(f, fullgraph=True)(x_comp, ids, w)
    loss_comp.backward()
    torch.testing.assert_close(loss_comp, loss_eager)
    assert_bitwise_equal(x_comp.grad, x_eager.grad, "compiled x.grad")
    assert_bitwise_equal(x_eager.grad, ref_scatter(w, ids, L), "eager x.grad")


# --------------------------------------------------------------------------- #
# eager CPU calls skip the custom ops' dispatch
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_eager_cpu_path_matches_the_custom_ops(dtype):
    """In eager mode on the CPU, gather_rows / scatter_rows run the cpp kernels from autograd Functions;
    the custom ops (what torch.compile runs) give the same bits, forward and backward; a traced call
    (make_fx) still goes through the custom op."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 5, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(11, generator=g)[:4] for _ in range(3)])
    grad = torch.randn(3, 4, 5, generator=g).to(dtype)
    results = []
    for eager in (True, False):
        leaf = x.clone().requires_grad_(True)
        out = ops.gather_rows(leaf, ids) if eager else torch.ops.mvmae_fast.gather_rows(leaf, ids, True, "")
        assert ("_EagerGatherRows" in type(out.grad_fn).__name__) == eager, type(out.grad_fn).__name__
        out.backward(grad)
        y = grad.clone().requires_grad_(True)
        scattered = ops.scatter_rows(y, ids, 11) if eager else torch.ops.mvmae_fast.scatter_rows(y, ids, 11, True, "")
        assert ("_EagerScatterRows" in type(scattered.grad_fn).__name__) == eager
        scattered.backward(x)
        results.append((out.detach(), leaf.grad, scattered.detach(), y.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    graph = torch.fx.experimental.proxy_tensor.make_fx(lambda t: ops.gather_rows(t, ids))(x)
    assert "mvmae_fast.gather_rows" in str(graph.graph)
    with pytest.raises(ValueError, match="must lie in"):
        ops.gather_rows(x, ids + 11)
