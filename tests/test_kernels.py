"""distill_kernels: torch paths against each other, Triton kernels (interpreted on CPU) against the
torch references, backend dispatch and argument checks.

Each Triton case compares the output, the final state and the gradients of q, k, v, the initial
state, the log-decay (and the polynomial coefficients) under random cotangents. Shapes are small
because the interpreter costs 0.1-2 s a call; chunk_size=16 gives several chunks at T <= 63.
On a machine without CUDA, conftest.py sets TRITON_INTERPRET=1 before triton is first imported.
"""

import sys

import pytest
import torch

import distill_kernels as ops
from distill_kernels import naive_linear_attn, poly, torch_chunk_linear_attn, torch_recurrent_linear_attn, validate
from distill_kernels.poly import chunk_poly_attn as torch_chunk_poly_attn
from distill_kernels.poly import poly_feature_dim, poly_features

try:
    from distill_kernels import triton_chunk, triton_recurrent
except ImportError:  # the torch tests still run; the Triton ones are skipped
    triton_chunk = triton_recurrent = None
needs_triton = pytest.mark.skipif(triton_chunk is None, reason="triton is not installed")
DEVICE = "cuda" if triton_chunk is not None and not triton_chunk.INTERPRETED else "cpu"
# relative to the largest entry; a GPU rounds 16-bit runs' fp32 operands to tf32 (fp16) or bf16
TOL = {torch.float32: 2e-5, torch.float16: 2e-3 if DEVICE == "cpu" else 4e-3, torch.bfloat16: 1.6e-2}


def make_inputs(B, T, H, Hk, F, Dv, decay, h0, dtype=torch.float32, state_dim=None, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    q = rand(B, T, H, F, scale=F**-0.5).to(dtype).requires_grad_()
    k = rand(B, T, Hk, F, scale=F**-0.5).to(dtype).requires_grad_()
    v = rand(B, T, Hk, Dv).to(dtype).requires_grad_()
    ld = (torch.rand(Hk, generator=gen).to(device) * -0.3 - 0.01).requires_grad_() if decay else None
    s0 = rand(B, Hk, state_dim or F, Dv).requires_grad_() if h0 else None
    return q, k, v, ld, s0


def run_with_grads(fn, args, seed=1):
    """fn(*args) -> (o, state); returns [o, state, *grads of the tensor args] with fixed cotangents."""
    o, state = fn(*args)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen).to(o.device)
    dstate = torch.randn(state.shape, generator=gen).to(o.device)
    leaves = [x for x in args if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad((o * do).sum() + (state * dstate).sum(), leaves)
    return [o, state, *grads]


def assert_match(got, want, tol, names):
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        err = (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-6)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def names_for(args, first=("q", "k", "v", "log_decay", "initial_state")):
    return ["o", "final_state"] + [f"d{n}" for n, x in zip(first, args) if isinstance(x, torch.Tensor)]


# ------------------------------------------------------------------ torch paths


@pytest.mark.parametrize(
    "B,T,H,Hk,F,Dv,decay,h0,chunk",
    [
        (2, 63, 4, 2, 24, 20, True, True, 16),
        (1, 63, 2, 2, 24, 60, False, False, 64),
        (2, 17, 3, 1, 7, 65, True, False, 8),
        (1, 1, 2, 1, 5, 3, False, True, 64),
    ],
)
def test_torch_chunk_and_recurrent_match_naive(B, T, H, Hk, F, Dv, decay, h0, chunk):
    args = make_inputs(B, T, H, Hk, F, Dv, decay, h0)  # the torch paths compute in fp32 whatever the input
    want = run_with_grads(naive_linear_attn, args)
    chunked = run_with_grads(lambda *a: torch_chunk_linear_attn(*a, chunk_size=chunk), args)
    assert_match(chunked, want, TOL[torch.float32], names_for(args))
    assert_match(run_with_grads(torch_recurrent_linear_attn, args), want, TOL[torch.float32], names_for(args))


def test_torch_poly_reference_matches_its_kernel():
    q, k, v, ld, s0 = make_inputs(2, 9, 4, 2, 3, 5, True, False)
    coeffs = torch.randn(4, 3)
    o, _ = torch_chunk_poly_attn(q, k, v, coeffs, ld)
    s = torch.einsum("btigr,bsir->bigts", q.view(2, 9, 2, 2, 3), k)  # (B, Hk, G, T, T)
    c = coeffs.view(2, 2, 3)[None, :, :, None, None]  # (1, Hk, G, 1, 1, p+1)
    lag = torch.arange(9)[:, None] - torch.arange(9)[None, :]
    mask = torch.where(lag >= 0, torch.exp(ld[:, None, None, None] * lag.clamp(min=0)), 0.0)[None]
    scores = (c[..., 0] + c[..., 1] * s + c[..., 2] * s**2) * mask
    want = torch.einsum("bigts,bsid->btigd", scores, v).reshape(2, 9, 4, 5)
    torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_poly_feature_layout(degree):
    r, H = 4, 2
    x, y = torch.randn(3, 5, H, r, dtype=torch.float64), torch.randn(3, 5, H, r, dtype=torch.float64)
    coeffs = torch.randn(H, degree + 1, dtype=torch.float64)
    fx, fy = poly_features(x, degree, coeffs), poly_features(y, degree)
    assert fx.shape[-1] == poly_feature_dim(r, degree)
    s = (x * y).sum(-1)
    want = sum(coeffs[:, i] * s**i for i in range(degree + 1))
    torch.testing.assert_close((fx.double() * fy.double()).sum(-1), want)
    if degree >= 2:  # degree-2 rows follow torch.triu_indices(r, r), weight sqrt(2) off the diagonal
        i, j = torch.triu_indices(r, r)
        w = torch.where(i == j, 1.0, 2**0.5).double()
        torch.testing.assert_close(fy[..., 1 + r : 1 + r + len(i)].double(), y[..., i] * y[..., j] * w)


def test_poly_state_layout_matches_the_feature_map():
    """The fused scan's state is interchangeable with the poly feature map's (distill.feature_maps)."""
    from distill.feature_maps import build_feature_map

    fm = build_feature_map("poly", {"degree": 2, "rank": 3}, 8, 4, 2)
    with torch.no_grad():
        fm.coeffs.copy_(torch.randn(4, 3))
        fm.proj.copy_(torch.randn(2, 8, 3))
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    torch.testing.assert_close(poly_features(fm.project_q(q), 2, fm.coeffs), fm.phi_q(q))
    torch.testing.assert_close(poly_features(fm.project_k(k), 2), fm.phi_k(k))


# ------------------------------------------------------------------ Triton chunked scan

CHUNK_CASES = [
    # B, T, H, Hk, F, Dv, decay, h0, dtype, block_f
    pytest.param(1, 63, 2, 1, 24, 20, True, True, torch.float32, None, id="gqa-decay-h0-fp32"),
    pytest.param(1, 63, 2, 2, 24, 60, False, False, torch.float32, None, id="plain-D60-fp32"),
    pytest.param(2, 40, 4, 2, 40, 65, True, True, torch.float32, 16, id="3-feature-tiles-Dv65-fp32"),
    pytest.param(1, 33, 2, 1, 32, 17, True, False, torch.float16, None, id="gqa-decay-fp16"),
    pytest.param(1, 20, 1, 1, 16, 16, False, True, torch.bfloat16, None, id="h0-bf16"),
    pytest.param(1, 20, 2, 1, 256, 16, True, True, torch.float32, None, id="F256-fp32"),
    pytest.param(2, 1, 2, 2, 20, 16, True, True, torch.float32, None, id="T1-fp32"),
]


@needs_triton
@pytest.mark.parametrize("B,T,H,Hk,F,Dv,decay,h0,dtype,block_f", CHUNK_CASES)
def test_triton_chunk_matches_reference(B, T, H, Hk, F, Dv, decay, h0, dtype, block_f):
    args = make_inputs(B, T, H, Hk, F, Dv, decay, h0, dtype, device=DEVICE)
    got = run_with_grads(lambda *a: triton_chunk.chunk_linear_attn(*a, chunk_size=16, block_f=block_f), args)
    want = run_with_grads(naive_linear_attn, args)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert_match(got, want, TOL[dtype], names_for(args))


POLY_CASES = [
    # B, T, H, Hk, r, Dv, degree, decay, h0, dtype
    pytest.param(1, 63, 2, 1, 5, 20, 2, True, True, torch.float32, id="deg2-gqa-decay-h0-fp32"),
    pytest.param(1, 40, 2, 2, 4, 33, 2, False, False, torch.float32, id="deg2-plain-fp32"),
    pytest.param(1, 24, 4, 2, 6, 17, 1, True, True, torch.float32, id="deg1-gqa-fp32"),
    pytest.param(1, 30, 2, 1, 3, 16, 2, True, False, torch.float16, id="deg2-fp16"),
]


@needs_triton
@pytest.mark.parametrize("B,T,H,Hk,r,Dv,degree,decay,h0,dtype", POLY_CASES)
def test_triton_poly_matches_reference(B, T, H, Hk, r, Dv, degree, decay, h0, dtype):
    F = poly_feature_dim(r, degree)
    q, k, v, ld, s0 = make_inputs(B, T, H, Hk, r, Dv, decay, h0, dtype, state_dim=F, device=DEVICE)
    coeffs = (torch.randn(H, degree + 1, generator=torch.Generator().manual_seed(2)) + 1).to(DEVICE).requires_grad_()
    args = (q, k, v, coeffs, ld, s0)
    got = run_with_grads(lambda *a: triton_chunk.chunk_poly_attn(*a, chunk_size=16), args)
    want = run_with_grads(torch_chunk_poly_attn, args)
    assert got[1].shape == (B, Hk, F, Dv)
    names = names_for(args, ("q_proj", "k_proj", "v", "coeffs", "log_decay", "initial_state"))
    assert_match(got, want, TOL[dtype], names)


@needs_triton
def test_triton_chunk_state_carries_across_calls():
    """Prefill in two pieces through the final/initial state equals one call."""
    q, k, v, ld, _ = make_inputs(1, 40, 2, 1, 16, 16, True, False, device=DEVICE)
    with torch.no_grad():
        o, s = triton_chunk.chunk_linear_attn(q, k, v, ld, chunk_size=16)
        o1, s1 = triton_chunk.chunk_linear_attn(q[:, :23], k[:, :23], v[:, :23], ld, chunk_size=16)
        o2, s2 = triton_chunk.chunk_linear_attn(q[:, 23:], k[:, 23:], v[:, 23:], ld, s1, chunk_size=16)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, s, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_chunk_takes_strided_heads():
    """q/k/v may be slices of a fused projection (any B/T/H strides, unit stride on the last dim)."""
    qkv = torch.randn(1, 20, 3, 2, 16, device=DEVICE)  # (B, T, {q,k,v}, H, D)
    q, k, v = qkv.unbind(2)
    with torch.no_grad():
        got = triton_chunk.chunk_linear_attn(q, k, v, chunk_size=16)
    want = naive_linear_attn(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ Triton decode step


@needs_triton
@pytest.mark.parametrize(
    "B,T,H,Hk,F,Dv,decay",
    [(3, 1, 4, 2, 100, 65, True), (1, 5, 2, 1, 24, 20, False), (2, 3, 3, 3, 17, 129, True)],
)
def test_triton_recurrent_matches_reference(B, T, H, Hk, F, Dv, decay):
    with torch.no_grad():
        q, k, v, ld, s0 = make_inputs(B, T, H, Hk, F, Dv, decay, True, torch.float16, device=DEVICE)
        want_o, want_s = naive_linear_attn(q, k, v, ld, s0)
        o, s = triton_recurrent.recurrent_linear_attn(q, k, v, ld, s0)
        state = s0.clone()
        o2, s2 = triton_recurrent.recurrent_linear_attn(q, k, v, ld, state, inplace=True)
    assert s2 is state
    for got_o, got_s in ((o, s), (o2, s2)):
        torch.testing.assert_close(got_o, want_o, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got_s, want_s, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_recurrent_falls_back_to_chunk_for_grads():
    args = make_inputs(1, 4, 2, 1, 16, 16, True, True, device=DEVICE)
    assert_match(run_with_grads(triton_recurrent.recurrent_linear_attn, args), run_with_grads(naive_linear_attn, args),
                 TOL[torch.float32], names_for(args))


# ------------------------------------------------------------------ dispatch


@needs_triton
def test_dispatch_triton_backend_runs_on_cpu_when_interpreted(monkeypatch):
    monkeypatch.setenv("DISTILL_BACKEND", "triton")
    assert ops.resolve_backend(torch.device(DEVICE)) == "triton"
    q, k, v, ld, s0 = make_inputs(1, 5, 2, 1, 3, 4, True, False, state_dim=poly_feature_dim(3, 2), device=DEVICE)
    coeffs = torch.tensor([[1.0, 1.0, 0.5], [0.5, -1.0, 2.0]], device=DEVICE)
    with torch.no_grad():
        o, s = ops.chunk_poly_attn(q, k, v, coeffs, ld)
        want_o, want_s = torch_chunk_poly_attn(q, k, v, coeffs, ld)
        torch.testing.assert_close((o, s), (want_o, want_s), rtol=1e-5, atol=1e-5)
        # decode one more token from the prefill state, in place, through the dispatcher
        nq, nk, nv, _, _ = make_inputs(1, 1, 2, 1, 3, 4, False, False, seed=5, device=DEVICE)
        o1, s1 = ops.recurrent_poly_attn(nq, nk, nv, coeffs, ld, s, inplace=True)
        full = torch_chunk_poly_attn(torch.cat([q, nq], 1), torch.cat([k, nk], 1), torch.cat([v, nv], 1), coeffs, ld)
    assert s1 is s
    torch.testing.assert_close((o1[:, 0], s1), (full[0][:, -1], full[1]), rtol=1e-5, atol=1e-5)


def test_dispatch_auto_and_torch_on_cpu(monkeypatch):
    for name in ("auto", "torch"):
        monkeypatch.setenv("DISTILL_BACKEND", name)
        assert ops.resolve_backend(torch.device("cpu")) == "torch"
    q, k, v, ld, s0 = make_inputs(1, 6, 2, 1, 4, 3, True, True)
    with torch.no_grad():
        state = s0.clone()
        o, s = ops.recurrent_linear_attn(q, k, v, ld, state, inplace=True)
        want = naive_linear_attn(q, k, v, ld, s0)
    assert s is state
    torch.testing.assert_close((o, s), want)


@needs_triton
def test_dispatch_rejects_backends_that_cannot_run(monkeypatch):
    monkeypatch.setenv("DISTILL_BACKEND", "fla")
    with pytest.raises(ValueError, match="fla needs CUDA"):
        ops.resolve_backend(torch.device("cpu"))
    monkeypatch.setenv("DISTILL_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown; choose one of auto, torch, triton, fla"):
        ops.resolve_backend(torch.device("cpu"))
    monkeypatch.setenv("DISTILL_BACKEND", "triton")
    monkeypatch.setattr(triton_chunk, "INTERPRETED", False)
    monkeypatch.setattr(triton_chunk, "_LIBRARY_INTERPRETED", False)
    with pytest.raises(ValueError, match="built for a GPU: set TRITON_INTERPRET=1"):
        ops.resolve_backend(torch.device("cpu"))
    monkeypatch.setattr(triton_chunk, "_LIBRARY_INTERPRETED", True)
    with pytest.raises(ValueError, match="TRITON_INTERPRET changed between importing triton"):
        ops.resolve_backend(torch.device("cpu"))
    with pytest.raises(ValueError, match="already registered"):
        ops.register_backend("torch", lambda: None)


# ------------------------------------------------------------------ one check, one resolution


def _count_calls(monkeypatch, func) -> list:
    """Wrap ``func`` wherever a distill_kernels module bound it; returns the list its calls append to."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return func(*args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("distill_kernels"):
            for attr, value in list(vars(module).items()):
                if value is func:
                    monkeypatch.setattr(module, attr, counting)
    return calls


def _public_calls():
    """name -> (fn() -> (o, state) through the dispatcher, the torch reference, is a poly op)."""
    q, k, v, ld, s0 = make_inputs(1, 5, 2, 1, 4, 3, True, True, device=DEVICE)  # needs grads: recurrent
    F2, F3 = poly_feature_dim(3, 2), poly_feature_dim(3, 3)  # on Triton falls back to the chunk kernel
    qp, kp, vp, ldp, sp2 = make_inputs(1, 5, 2, 1, 3, 3, True, True, state_dim=F2, seed=1, device=DEVICE)
    sp3 = torch.randn(1, 1, F3, 3, device=DEVICE)
    c2 = torch.tensor([[1.0, 1.0, 0.5], [0.5, -1.0, 2.0]], device=DEVICE)
    c3 = torch.tensor([[1.0, 1.0, 0.5, 0.2], [0.5, -1.0, 2.0, 0.1]], device=DEVICE)
    state = s0.detach().clone()

    def decode_inplace():
        with torch.no_grad():
            o, s = ops.recurrent_linear_attn(q[:, :1], k[:, :1], v[:, :1], ld, state, inplace=True)
        assert s is state
        return o, s

    with torch.no_grad():
        want_decode = naive_linear_attn(q[:, :1], k[:, :1], v[:, :1], ld, s0)
    return {
        "chunk": (lambda: ops.chunk_linear_attn(q, k, v, ld, s0), naive_linear_attn(q, k, v, ld, s0), False),
        "recurrent": (lambda: ops.recurrent_linear_attn(q, k, v, ld, s0), naive_linear_attn(q, k, v, ld, s0), False),
        "recurrent (decode, inplace)": (decode_inplace, want_decode, False),
        "chunk_poly": (lambda: ops.chunk_poly_attn(qp, kp, vp, c2, ldp, sp2),
                       torch_chunk_poly_attn(qp, kp, vp, c2, ldp, sp2), True),
        "chunk_poly (degree 3, materialised)": (lambda: ops.chunk_poly_attn(qp, kp, vp, c3, ldp, sp3),
                                                torch_chunk_poly_attn(qp, kp, vp, c3, ldp, sp3), True),
        "recurrent_poly": (lambda: ops.recurrent_poly_attn(qp, kp, vp, c2, ldp, sp2),
                           torch_chunk_poly_attn(qp, kp, vp, c2, ldp, sp2), True),
    }


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_each_public_call_checks_once_and_resolves_once(backend, monkeypatch):
    """Every entry point runs check_scan_args exactly once (inside check_poly_args for the poly ops),
    whichever backend runs it, and the backend is resolved once per (DISTILL_BACKEND, device type)."""
    monkeypatch.setenv("DISTILL_BACKEND", backend)
    monkeypatch.setattr(ops, "_RESOLVED", {})
    scan_checks = _count_calls(monkeypatch, validate.check_scan_args)
    poly_checks = _count_calls(monkeypatch, poly.check_poly_args)
    resolutions = _count_calls(monkeypatch, ops.resolve_backend)
    if triton_chunk is not None:
        device_checks = _count_calls(monkeypatch, triton_chunk.check_device)
    for name, (call, want, is_poly) in _public_calls().items():
        scan_checks.clear(), poly_checks.clear()
        o, s = call()
        assert len(scan_checks) == 1, f"{name}: check_scan_args ran {len(scan_checks)} times"
        assert len(poly_checks) == int(is_poly), f"{name}: check_poly_args ran {len(poly_checks)} times"
        assert scan_checks[0].get("unit_stride", False) == (backend == "triton"), name
        torch.testing.assert_close((o, s), want, rtol=1e-5, atol=1e-5, msg=name)
    assert len(resolutions) == 1
    if triton_chunk is not None:
        assert len(device_checks) == (backend == "triton")
    monkeypatch.setenv("DISTILL_BACKEND", "torch" if backend == "triton" else "auto")  # a new key: resolved again
    for _ in range(2):
        ops.chunk_linear_attn(*make_inputs(1, 3, 2, 1, 4, 3, False, False, device=DEVICE))
    assert len(resolutions) == 2


# ------------------------------------------------------------------ bad input


def _bad_inputs():
    """(name, changed arguments, message, only the Triton kernels reject it), and the good arguments."""
    q, k, v, ld, s0 = (x.detach() for x in make_inputs(2, 8, 4, 2, 16, 8, True, True, device=DEVICE))
    return [
        ("k", dict(k=k[:, :, :, :8]), r"k must be \[B, T, Hk, F\] = \[2, 8, Hk, 16\]", False),
        ("k heads", dict(k=torch.randn(2, 8, 3, 16, device=DEVICE)), "Hk dividing H=4", False),
        ("v", dict(v=v[:, :7]), r"v must be \[B, T, Hk, Dv\] = \[2, 8, 2, Dv\]", False),
        ("log_decay", dict(log_decay=ld[:1]), r"log_decay must be \[Hk\] = \[2\]", False),
        ("initial_state", dict(initial_state=s0[:, :, :4]),
         r"initial_state must be \[B, Hk, F, Dv\] = \[2, 2, 16, 8", False),
        ("dtype", dict(k=k.half()), "k must have the dtype of q", False),
        ("int", dict(v=v.long()), "v must be one of float32, float16, bfloat16, float64, got torch.int64", False),
        ("float64", dict(q=q.double(), k=k.double()),
         "q must be one of float32, float16, bfloat16, got torch.float64", True),
        ("stride", dict(q=q.transpose(2, 3).contiguous().transpose(2, 3)),
         "q must have stride 1 on its last dim", True),
        ("q dims", dict(q=q[0]), "q must be 4-D", False),
        ("not a tensor", dict(q=q.tolist()), "q must be a torch.Tensor, got list", False),
    ], dict(q=q, k=k, v=v, log_decay=ld, initial_state=s0)


BAD_CASES = [case[0] for case in _bad_inputs()[0]]


def _bad_case(name):
    cases, good = _bad_inputs()
    _, change, message, triton_only = next(c for c in cases if c[0] == name)
    return {**good, **change}, message, triton_only


@needs_triton
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_raises_before_launch(case):
    kwargs, message, _ = _bad_case(case)
    message = message.replace(", float64, got", ", got")  # the kernels take no float64
    for fn in (triton_chunk.chunk_linear_attn, triton_recurrent.recurrent_linear_attn):
        with pytest.raises(ValueError, match=message):
            fn(**kwargs)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("case", BAD_CASES)
def test_dispatch_rejects_bad_input(case, backend, monkeypatch):
    """The entry points' one check is the only one: the backends trust it."""
    monkeypatch.setenv("DISTILL_BACKEND", backend)
    kwargs, message, triton_only = _bad_case(case)
    if backend == "triton":
        message = message.replace(", float64, got", ", got")
    for fn in (ops.chunk_linear_attn, ops.recurrent_linear_attn):
        if triton_only and backend == "torch":  # the torch backend takes float64 and any strides
            o, _ = fn(**kwargs)
            assert o.shape == (2, 8, 4, 8)
            continue
        with pytest.raises(ValueError, match=message):
            fn(**kwargs)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_poly_bad_input(backend, monkeypatch):
    monkeypatch.setenv("DISTILL_BACKEND", backend)
    q, k, v, _, _ = make_inputs(1, 4, 2, 1, 3, 5, False, False, device=DEVICE)
    entry_points = [ops.chunk_poly_attn, ops.recurrent_poly_attn]
    if backend == "triton":
        entry_points.append(triton_chunk.chunk_poly_attn)
    for fn in entry_points:
        with pytest.raises(ValueError, match=r"coeffs must be \[H, p\+1\] = \[2, p\+1\]"):
            fn(q, k, v, torch.ones(3, 3, device=DEVICE))
        with pytest.raises(ValueError, match=r"initial_state must be \[B, Hk, F, Dv\] = \[1, 1, 10, 5\]"):
            state = torch.zeros(1, 1, 3, 5, device=DEVICE)
            fn(q, k, v, torch.ones(2, 3, device=DEVICE), initial_state=state)
        with pytest.raises(ValueError, match="q_proj must be a torch.Tensor"):
            fn(None, k, v, torch.ones(2, 3, device=DEVICE))
    if backend == "triton":
        with pytest.raises(ValueError, match="p <= 2"):
            triton_chunk.chunk_poly_attn(q, k, v, torch.ones(2, 4, device=DEVICE))
        with pytest.raises(ValueError, match="chunk_size must be a power of two >= 16"):
            triton_chunk.chunk_poly_attn(q, k, v, torch.ones(2, 3, device=DEVICE), chunk_size=8)


# ------------------------------------------------------------------ benchmark runner


@needs_triton
def test_kernel_benchmark_runner_smoke(tmp_path):
    """benchmarks.kernels checks and times every implementation and writes its reports."""
    from benchmarks import kernels as bench

    cases = [bench.Case("chunk", 20, 16, H=2, Hk=1, Dv=17, dtype="float32", decay=True),
             bench.Case("decode", 1, 16, B=2, H=2, Hk=1, Dv=17, dtype="float32", fla=False)]
    data = bench.run_kernel_suite(tmp_path, quick=True, cases=cases, every=True)
    rows = {(r["op"], r["mode"], r["impl"]): r for r in data["rows"]}
    for key in [("chunk", "fwd", "triton"), ("chunk", "fwd+bwd", "triton"), ("decode", "fwd", "triton")]:
        assert rows[key]["ms"] > 0 and "FAILED" not in rows[key]["check"], rows[key]
    if DEVICE == "cpu":
        assert "error" in rows[("chunk", "fwd", "fla")]["check"]  # fla cannot run here, and says so
    assert (tmp_path / "kernels.json").exists()
    assert "| chunk | fwd+bwd | triton |" in (tmp_path / "kernels.md").read_text()
