"""distill_kernels' gated recurrences: gated linear attention (GLA) and the (gated) delta rule.

The chunked and the recurrent torch forms are compared with the per-step references
(``naive_gla``, ``naive_delta_rule``) in float64: the output, the final state and the gradient of
every input (q, k, v, log_alpha, beta, initial_state) under fixed random cotangents, at odd sizes,
GQA and not, with and without an initial state, gates near 1 and small gates; ``chunk_head_gla``
(one gate per kv head) against ``naive_gla`` with that gate on every feature. Then: fp32 stays
finite and accurate with small gates over whole chunks, padding tokens leave the state alone, the
delta rule with beta = 1 and orthonormal keys stores and retrieves values exactly, decoding from a
chunked prefill's state equals one chunked pass, and the entry points reject bad arguments.
Last, the GPU check in benchmarks/gpu_kernels.sh runs once on CPU (DRY=1), so that its harness
is known to work before GPU time is spent on it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distill_kernels as ops
from distill_kernels import delta, gated, validate

F64 = torch.float64
TOL64 = 1e-9  # relative to the largest entry; float64 rounding sits near 1e-14


def _rand(gen, *shape, dtype=F64):
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


def _log_gates(gen, shape, gates, dtype=F64):
    """log alpha <= 0: "near1" in [-0.05, 0], "small" in [-5, 0] (alpha down to exp(-5) per step)."""
    low = {"near1": 0.05, "small": 5.0}[gates]
    return (-low * torch.rand(*shape, generator=gen, dtype=F64)).to(dtype)


def gla_inputs(B, T, H, Hk, F, Dv, gates="near1", h0=True, dtype=F64, seed=0):
    """[q, k, v, log_alpha, initial_state], leaves that require grad (initial_state may be None)."""
    gen = torch.Generator().manual_seed(seed)
    q = _rand(gen, B, T, H, F, dtype=dtype) * F**-0.5
    k = _rand(gen, B, T, Hk, F, dtype=dtype) * F**-0.5
    v = _rand(gen, B, T, Hk, Dv, dtype=dtype)
    log_alpha = _log_gates(gen, (B, T, Hk, F), gates, dtype)
    s0 = _rand(gen, B, Hk, F, Dv) if h0 else None
    return [None if x is None else x.requires_grad_() for x in (q, k, v, log_alpha, s0)]


def delta_inputs(B, T, H, Hk, F, Dv, gates=None, h0=True, dtype=F64, seed=0):
    """[q, k, v, beta, log_alpha, initial_state]: k has unit rows, beta in (0, 1), gates None = DeltaNet."""
    gen = torch.Generator().manual_seed(seed)
    q = _rand(gen, B, T, H, F, dtype=dtype) * F**-0.5
    k = torch.nn.functional.normalize(_rand(gen, B, T, Hk, F), dim=-1).to(dtype)
    v = _rand(gen, B, T, Hk, Dv, dtype=dtype)
    beta = torch.sigmoid(_rand(gen, B, T, Hk)).to(dtype)
    log_alpha = None if gates is None else _log_gates(gen, (B, T, Hk), gates, dtype)
    s0 = _rand(gen, B, Hk, F, Dv) if h0 else None
    return [None if x is None else x.requires_grad_() for x in (q, k, v, beta, log_alpha, s0)]


def run_with_grads(fn, args, seed=1):
    """fn(*args) -> (o, state); returns {name: tensor} for o, the state and the tensor args' grads."""
    o, state = fn(*args)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=F64).to(o.dtype)  # the same draws whatever the dtype
    dstate = torch.randn(state.shape, generator=gen, dtype=F64).to(state.dtype)
    leaves = [x for x in args if isinstance(x, torch.Tensor)]
    grads = torch.autograd.grad((o * do).sum() + (state * dstate).sum(), leaves)
    return [o, state, *grads]


def assert_match(got, want, tol, names):
    assert len(got) == len(want) == len(names)
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.isfinite(a).all(), f"{name}: not finite"
        err = (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-12)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def grad_names(args, names):
    return ["o", "final_state"] + [f"d{n}" for n, x in zip(names, args) if isinstance(x, torch.Tensor)]


GLA_NAMES = ("q", "k", "v", "log_alpha", "initial_state")
DELTA_NAMES = ("q", "k", "v", "beta", "log_alpha", "initial_state")

# B, T, H, Hk, F, Dv, gates, h0: T around the chunk size (64) and a sub-chunk (16); GQA and H == Hk
GLA_CASES = [
    (2, 1, 4, 2, 5, 5, "near1", True),
    (1, 37, 4, 2, 16, 5, "small", False),
    (2, 63, 2, 2, 5, 16, "near1", True),
    (1, 64, 4, 2, 16, 16, "small", True),
    (1, 65, 4, 4, 5, 5, "near1", False),
    (1, 130, 4, 2, 16, 5, "small", True),
]
DELTA_CASES = [
    (2, 1, 4, 2, 5, 5, None, True),
    (1, 37, 4, 2, 16, 5, "small", False),
    (2, 63, 2, 2, 5, 16, None, False),
    (1, 64, 4, 2, 16, 16, "near1", True),
    (1, 65, 4, 4, 5, 5, "small", True),
    (1, 130, 4, 2, 16, 5, "near1", True),
    (1, 130, 2, 1, 5, 16, None, True),
]


# ------------------------------------------------------------------ forms against the references


@pytest.mark.parametrize("B,T,H,Hk,F,Dv,gates,h0", GLA_CASES)
def test_gla_chunk_and_recurrent_match_naive(B, T, H, Hk, F, Dv, gates, h0):
    args = gla_inputs(B, T, H, Hk, F, Dv, gates, h0)
    want = run_with_grads(gated.naive_gla, args)
    names = grad_names(args, GLA_NAMES)
    assert want[0].dtype == want[1].dtype == F64
    assert_match(run_with_grads(gated.chunk_gla, args), want, TOL64, names)
    assert_match(run_with_grads(gated.recurrent_gla, args), want, TOL64, names)


def test_gla_chunk_sizes():
    """Other chunk / sub-chunk sizes, including a sub-chunk as large as the chunk."""
    args = gla_inputs(1, 45, 4, 2, 6, 7, "small", True, seed=3)
    want = run_with_grads(gated.naive_gla, args)
    names = grad_names(args, GLA_NAMES)
    for chunk_size, sub_chunk in ((64, 16), (16, 4), (32, 32), (8, 16)):
        fn = lambda *a: gated.chunk_gla(*a, chunk_size=chunk_size, sub_chunk=sub_chunk)  # noqa: E731
        assert_match(run_with_grads(fn, args), want, TOL64, names)
    with pytest.raises(ValueError, match="chunk_size must be a multiple of sub_chunk"):
        gated.chunk_gla(*args, chunk_size=24, sub_chunk=16)


@pytest.mark.parametrize("gates,sub_chunked", [("near1", False), ("small", True)])
def test_gla_chunk_takes_the_path_its_gates_allow(monkeypatch, gates, sub_chunked):
    """Gates near 1 take the factored form, gates that spread past FACTORED_SPREAD within a chunk
    the sub-chunked one; each matches the reference, at two chunk sizes."""
    calls = []
    real = gated._sub_chunk_scores
    monkeypatch.setattr(gated, "_sub_chunk_scores", lambda *a: calls.append(1) or real(*a))
    args = gla_inputs(2, 75, 4, 2, 6, 5, gates, True, seed=4)
    want = run_with_grads(gated.naive_gla, args)
    for chunk_size in (32, 64):
        calls.clear()
        fn = lambda *a: gated.chunk_gla(*a, chunk_size=chunk_size)  # noqa: E731
        assert_match(run_with_grads(fn, args), want, TOL64, grad_names(args, GLA_NAMES))
        assert bool(calls) == sub_chunked


def test_gla_factored_fp32_at_the_spread_limit():
    """fp32 with every feature decaying by exp(-39) over each 32-token chunk, just inside
    FACTORED_SPREAD: exp(+-b) reach exp(+-39); the factored form stays accurate."""
    per_token = -39.0 / 32
    assert -per_token * 32 <= gated.FACTORED_SPREAD
    gla = gla_inputs(1, 100, 4, 2, 16, 8, "near1", True, dtype=torch.float32, seed=6)
    with torch.no_grad():
        gla[3].fill_(per_token)
    want = run_with_grads(gated.naive_gla, [x.detach().double().requires_grad_() for x in gla])
    assert_match(run_with_grads(gated.chunk_gla, gla), want, 2e-5, grad_names(gla, GLA_NAMES))


def _head_gated(args):
    """gla_inputs with one gate per kv head and token: log_alpha [B,T,Hk] (its first feature's)."""
    q, k, v, la, s0 = args
    return [q, k, v, la.detach()[..., 0].clone().requires_grad_(), s0]


def _naive_with_the_gate_on_every_feature(q, k, v, log_alpha, s0):
    return gated.naive_gla(q, k, v, log_alpha[..., None].expand_as(k), s0)


@pytest.mark.parametrize("B,T,H,Hk,F,Dv,gates,h0", GLA_CASES)
def test_head_gla_chunk_matches_naive_gla_with_the_gate_on_every_feature(B, T, H, Hk, F, Dv, gates, h0):
    """chunk_head_gla against naive_gla with the head's gate copied to every feature: output,
    state and every gradient (the gate's is the sum over the features the reference sees)."""
    args = _head_gated(gla_inputs(B, T, H, Hk, F, Dv, gates, h0))
    want = run_with_grads(_naive_with_the_gate_on_every_feature, args)
    names = grad_names(args, GLA_NAMES)
    assert_match(run_with_grads(gated.chunk_head_gla, args), want, TOL64, names)
    for chunk_size in (8, 16):
        fn = lambda *a: gated.chunk_head_gla(*a, chunk_size=chunk_size)  # noqa: E731
        assert_match(run_with_grads(fn, args), want, TOL64, names)


def test_head_gla_fp32_with_small_gates_over_whole_chunks():
    args = _head_gated(gla_inputs(1, 130, 4, 2, 16, 8, "small", True, dtype=torch.float32, seed=5))
    with torch.no_grad():
        args[3][:, 10:100] = -5.0
    want = run_with_grads(_naive_with_the_gate_on_every_feature, [x.detach().double().requires_grad_() for x in args])
    got = run_with_grads(ops.chunk_head_gla, args)
    assert all(torch.isfinite(x).all() for x in got)
    assert_match(got, want, 2e-5, grad_names(args, GLA_NAMES))


def test_head_gla_refuses_a_gate_per_feature():
    q, k, v, la, s0 = (x.detach() for x in gla_inputs(1, 4, 2, 1, 3, 2))
    with pytest.raises(ValueError, match=r"log_alpha must be \[B, T, Hk\] = \[1, 4, 1\]"):
        ops.chunk_head_gla(q, k, v, la, s0)


@pytest.mark.parametrize("B,T,H,Hk,F,Dv,gates,h0", DELTA_CASES)
def test_delta_rule_chunk_and_recurrent_match_naive(B, T, H, Hk, F, Dv, gates, h0):
    args = delta_inputs(B, T, H, Hk, F, Dv, gates, h0)
    want = run_with_grads(delta.naive_delta_rule, args)
    names = grad_names(args, DELTA_NAMES)
    assert want[0].dtype == want[1].dtype == F64
    assert_match(run_with_grads(delta.chunk_delta_rule, args), want, TOL64, names)
    assert_match(run_with_grads(delta.recurrent_delta_rule, args), want, TOL64, names)


def test_delta_rule_chunk_sizes():
    args = delta_inputs(1, 45, 4, 2, 6, 7, "small", True, seed=3)
    want = run_with_grads(delta.naive_delta_rule, args)
    names = grad_names(args, DELTA_NAMES)
    for chunk_size in (1, 16, 64):
        fn = lambda *a: delta.chunk_delta_rule(*a, chunk_size=chunk_size)  # noqa: E731
        assert_match(run_with_grads(fn, args), want, TOL64, names)


def test_fp32_small_gates_stay_finite_and_accurate():
    """fp32 with alpha = exp(-5) at every step: over a 64-token chunk exp(-b) would reach exp(320),
    far past fp32's range. The chunked forms must stay finite and match the float64 reference."""
    gla = gla_inputs(1, 130, 4, 2, 16, 8, "small", True, dtype=torch.float32, seed=5)
    with torch.no_grad():
        gla[3][:, 10:100] = -5.0
    want = run_with_grads(gated.naive_gla, [x.detach().double().requires_grad_() for x in gla])
    got = run_with_grads(gated.chunk_gla, gla)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert_match(got, want, 2e-5, grad_names(gla, GLA_NAMES))

    dr = delta_inputs(1, 130, 4, 2, 16, 8, "small", True, dtype=torch.float32, seed=5)
    with torch.no_grad():
        dr[4][:, 10:100] = -5.0
    want = run_with_grads(delta.naive_delta_rule, [x.detach().double().requires_grad_() for x in dr])
    assert_match(run_with_grads(delta.chunk_delta_rule, dr), want, 2e-5, grad_names(dr, DELTA_NAMES))


def test_dispatch_runs_the_torch_forms_on_cpu(monkeypatch):
    """The public entry points on CPU (auto and torch) give the torch forms' results; 16-bit in, fp32 out."""
    gla = gla_inputs(2, 20, 4, 2, 8, 6, "near1", True)
    dr = delta_inputs(2, 20, 4, 2, 8, 6, "near1", True)
    for name in ("auto", "torch"):
        monkeypatch.setenv("DISTILL_BACKEND", name)
        with torch.no_grad():
            torch.testing.assert_close(ops.chunk_gla(*gla), gated.naive_gla(*gla))
            torch.testing.assert_close(ops.recurrent_gla(*gla), gated.naive_gla(*gla))
            torch.testing.assert_close(ops.chunk_delta_rule(*dr), delta.naive_delta_rule(*dr))
            torch.testing.assert_close(ops.recurrent_delta_rule(*dr), delta.naive_delta_rule(*dr))
            half = [x.detach().bfloat16() for x in gla[:4]] + [gla[4].detach()]
            o, state = ops.chunk_gla(*half)
            assert o.dtype == state.dtype == torch.float32
            half = [x.detach().bfloat16() for x in dr[:5]] + [dr[5].detach()]
            o, state = ops.chunk_delta_rule(*half)
            assert o.dtype == state.dtype == torch.float32


def test_fla_backend_refuses_cpu(monkeypatch):
    monkeypatch.setenv("DISTILL_BACKEND", "fla")
    gla = gla_inputs(1, 4, 2, 1, 3, 2)
    dr = delta_inputs(1, 4, 2, 1, 3, 2)
    for fn, args in ((ops.chunk_gla, gla), (ops.recurrent_gla, gla),
                     (ops.chunk_delta_rule, dr), (ops.recurrent_delta_rule, dr)):
        with pytest.raises(ValueError, match="fla needs CUDA"):
            fn(*args)


# ------------------------------------------------------------------ padding


def _pad_positions(T_real, layout):
    """Sequence positions of the real tokens in a padded sequence, and the padded length."""
    real, t = [], 0
    for kind, n in layout:
        if kind == "real":
            real.extend(range(t, t + n))
        t += n
    assert len(real) == T_real
    return torch.tensor(real), t


# left padding, a run across the first chunk boundary (64), scattered pads, right padding
PAD_LAYOUT = [("pad", 3), ("real", 40), ("pad", 30), ("real", 1), ("pad", 1), ("real", 9), ("pad", 5)]


def _scatter(real_x, pad_x, idx, T):
    """A [B, T, ...] sequence holding ``pad_x`` everywhere but at ``idx``, where ``real_x`` goes."""
    out = pad_x[:, :T].clone()
    out[:, idx] = real_x
    return out


@pytest.mark.parametrize("form", ["naive", "chunk", "recurrent"])
def test_gla_padding_leaves_the_state_alone(form):
    """Padding tokens (k = 0, log_alpha = 0; q and v anything) change neither the state nor the
    real tokens' outputs, wherever they sit; a sequence of padding only returns the initial state."""
    fn = {"naive": gated.naive_gla, "chunk": gated.chunk_gla, "recurrent": gated.recurrent_gla}[form]
    idx, T = _pad_positions(50, PAD_LAYOUT)
    q, k, v, la, s0 = (x.detach() for x in gla_inputs(2, 50, 4, 2, 6, 5, "small", True))
    junk = gla_inputs(2, T, 4, 2, 6, 5, "small", False, seed=9)
    zeros_k, zeros_la = torch.zeros(2, T, 2, 6, dtype=F64), torch.zeros(2, T, 2, 6, dtype=F64)
    padded = [_scatter(q, junk[0].detach(), idx, T), _scatter(k, zeros_k, idx, T),
              _scatter(v, junk[2].detach(), idx, T), _scatter(la, zeros_la, idx, T), s0]
    o_want, s_want = gated.naive_gla(q, k, v, la, s0)
    o, s = fn(*padded)
    torch.testing.assert_close((o[:, idx], s), (o_want, s_want), rtol=1e-10, atol=1e-10)
    o, s = fn(junk[0].detach(), zeros_k, junk[2].detach(), zeros_la, s0)
    assert torch.equal(s, s0)


@pytest.mark.parametrize("form", ["naive", "chunk", "recurrent"])
@pytest.mark.parametrize("gated_rule", [False, True])
def test_delta_rule_padding_leaves_the_state_alone(form, gated_rule):
    """Padding tokens (beta = 0, log_alpha = 0; k, q and v anything, even non-zero keys) change
    neither the state nor the real tokens' outputs."""
    fn = {"naive": delta.naive_delta_rule, "chunk": delta.chunk_delta_rule,
          "recurrent": delta.recurrent_delta_rule}[form]
    idx, T = _pad_positions(50, PAD_LAYOUT)
    q, k, v, beta, la, s0 = (None if x is None else x.detach()
                             for x in delta_inputs(2, 50, 4, 2, 6, 5, "small" if gated_rule else None, True))
    junk = [x.detach() for x in delta_inputs(2, T, 4, 2, 6, 5, None, False, seed=9)[:3]]
    zeros = torch.zeros(2, T, 2, dtype=F64)
    padded = [_scatter(q, junk[0], idx, T), _scatter(k, junk[1], idx, T), _scatter(v, junk[2], idx, T),
              _scatter(beta, zeros, idx, T), None if la is None else _scatter(la, zeros, idx, T), s0]
    o_want, s_want = delta.naive_delta_rule(q, k, v, beta, la, s0)
    o, s = fn(*padded)
    torch.testing.assert_close((o[:, idx], s), (o_want, s_want), rtol=1e-10, atol=1e-10)
    o, s = fn(*junk, zeros, zeros if gated_rule else None, s0)
    torch.testing.assert_close(s, s0, rtol=0, atol=1e-14)


# ------------------------------------------------------------------ the delta rule's memory


@pytest.mark.parametrize("fn", [delta.naive_delta_rule, delta.chunk_delta_rule, delta.recurrent_delta_rule,
                                ops.chunk_delta_rule, ops.recurrent_delta_rule])
@pytest.mark.parametrize("gate", [None, "ones"])
def test_delta_rule_stores_and_retrieves_exactly(fn, gate):
    """beta = 1 and orthonormal keys: each write replaces the value under its key and leaves the
    others alone, so S_t^T k_j is the last value written under k_j (whatever the initial state).
    F tokens write every key once, then F more rewrite them in shuffled order with new values;
    the queries of the second half read random keys, half of them rewritten by then."""
    B, Hk, G, F, Dv = 2, 2, 2, 16, 5
    gen = torch.Generator().manual_seed(4)
    basis = torch.linalg.qr(torch.randn(B, Hk, F, F, generator=gen, dtype=F64))[0].transpose(-1, -2)  # rows
    order = torch.randperm(F, generator=gen)
    keys = torch.cat([basis, basis[:, :, order]], dim=2).transpose(1, 2)  # (B, 2F, Hk, F)
    v = torch.randn(B, 2 * F, Hk, Dv, generator=gen, dtype=F64)
    beta = torch.ones(B, 2 * F, Hk, dtype=F64)
    log_alpha = None if gate is None else torch.zeros(B, 2 * F, Hk, dtype=F64)
    s0 = torch.randn(B, Hk, F, Dv, generator=gen, dtype=F64)
    read = torch.randint(F, (2 * F,), generator=gen)  # the key each token's queries read
    q = basis[:, :, read].transpose(1, 2).repeat_interleave(G, dim=2)  # (B, 2F, H, F)
    o, state = fn(q, keys, v, beta, log_alpha, s0)

    last = torch.cat([torch.arange(F), F + torch.argsort(order)])  # where key j was written last
    retrieved = torch.einsum("bifd,bijf->bijd", state, basis)  # (B, Hk, F, Dv) S^T k_j
    torch.testing.assert_close(retrieved, v[:, last[F:]].transpose(1, 2), rtol=0, atol=1e-12)
    for t in range(F, 2 * F):
        j = read[t].item()
        written = F + torch.nonzero(order == j).item()  # the token that rewrites key j
        src = written if written <= t else j
        want = v[:, src].repeat_interleave(G, dim=1)  # (B, H, Dv)
        torch.testing.assert_close(o[:, t], want, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ decode after prefill


def test_decode_from_chunked_prefill_matches_one_chunked_pass():
    """Prefill 70 tokens with the chunked form, then decode 5 tokens one at a time in place: the
    outputs and the final state equal one chunked pass over all 75."""
    T0, n = 70, 5
    cases = [
        (ops.chunk_gla, ops.recurrent_gla, [x.detach() for x in gla_inputs(2, T0 + n, 4, 2, 8, 6, "small", True)]),
        (ops.chunk_delta_rule, ops.recurrent_delta_rule,
         [x.detach() for x in delta_inputs(2, T0 + n, 4, 2, 8, 6, "near1", True)]),
        (ops.chunk_delta_rule, ops.recurrent_delta_rule,
         [None if x is None else x.detach() for x in delta_inputs(2, T0 + n, 4, 2, 8, 6, None, True)]),
    ]
    for chunk, recurrent, args in cases:
        *seq, s0 = args
        o_full, s_full = chunk(*seq, s0)
        o_pre, state = chunk(*(None if x is None else x[:, :T0] for x in seq), s0)
        outs = [o_pre]
        with torch.no_grad():
            for t in range(T0, T0 + n):
                o_t, s = recurrent(*(None if x is None else x[:, t:t + 1] for x in seq), state, inplace=True)
                assert s is state
                outs.append(o_t)
        torch.testing.assert_close((torch.cat(outs, 1), state), (o_full, s_full), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ argument checks


def _bad_gla():
    q, k, v, la, s0 = (x.detach() for x in gla_inputs(2, 8, 4, 2, 16, 8))
    good = dict(q=q, k=k, v=v, log_alpha=la, initial_state=s0)
    return good, [
        (dict(k=k[:, :, :, :8]), r"k must be \[B, T, Hk, F\] = \[2, 8, Hk, 16\]"),
        (dict(k=torch.randn(2, 8, 3, 16, dtype=F64)), "Hk dividing H=4"),
        (dict(v=v[:, :7]), r"v must be \[B, T, Hk, Dv\] = \[2, 8, 2, Dv\]"),
        (dict(log_alpha=la[..., 0]), r"log_alpha must be \[B, T, Hk, F\] = \[2, 8, 2, 16\] \(one log-gate"),
        (dict(log_alpha=None), r"log_alpha must be \[B, T, Hk, F\] = \[2, 8, 2, 16\], got None"),
        (dict(log_alpha=la.long()), "log_alpha must be one of float32"),
        (dict(initial_state=s0[:, :, :4]), r"initial_state must be \[B, Hk, F, Dv\] = \[2, 2, 16, 8\]"),
        (dict(q=q.tolist()), "q must be a torch.Tensor, got list"),
        (dict(log_alpha=la.tolist()), "log_alpha must be a torch.Tensor, got list"),
    ]


def _bad_delta():
    q, k, v, beta, la, s0 = (x.detach() for x in delta_inputs(2, 8, 4, 2, 16, 8, "near1"))
    good = dict(q=q, k=k, v=v, beta=beta, log_alpha=la, initial_state=s0)
    return good, [
        (dict(k=k[:, :, :, :8]), r"k must be \[B, T, Hk, F\] = \[2, 8, Hk, 16\]"),
        (dict(v=v[:, :, :1]), r"v must be \[B, T, Hk, Dv\] = \[2, 8, 2, Dv\]"),
        (dict(beta=beta[..., None]), r"beta must be \[B, T, Hk\] = \[2, 8, 2\] \(one write strength"),
        (dict(beta=None), r"beta must be \[B, T, Hk\] = \[2, 8, 2\], got None"),
        (dict(beta=beta[:, :7]), r"beta must be \[B, T, Hk\] = \[2, 8, 2\]"),
        (dict(log_alpha=la[..., None].expand(2, 8, 2, 16)), r"log_alpha must be \[B, T, Hk\] = \[2, 8, 2\]"),
        (dict(beta=beta.bool()), "beta must be one of float32"),
        (dict(initial_state=s0[:1]), r"initial_state must be \[B, Hk, F, Dv\] = \[2, 2, 16, 8\]"),
        (dict(q=q[0]), "q must be 4-D"),
    ]


@pytest.mark.parametrize("rule", ["gla", "delta"])
def test_entry_points_reject_bad_arguments_in_one_line(rule, monkeypatch):
    monkeypatch.setenv("DISTILL_BACKEND", "auto")
    good, cases = _bad_gla() if rule == "gla" else _bad_delta()
    fns = (ops.chunk_gla, ops.recurrent_gla) if rule == "gla" else (ops.chunk_delta_rule, ops.recurrent_delta_rule)
    for change, message in cases:
        for fn in fns:
            with pytest.raises(ValueError, match=message) as err:
                fn(**{**good, **change})
            assert "\n" not in str(err.value), str(err.value)
    for fn in fns:  # and the good arguments pass
        o, state = fn(**good)
        assert o.shape == (2, 8, 4, 8) and state.shape == (2, 2, 16, 8)


def test_each_entry_point_checks_once(monkeypatch):
    """One argument check per public call (check_scan_args inside the rule's own check)."""
    monkeypatch.setenv("DISTILL_BACKEND", "torch")
    calls = []
    real = validate.check_scan_args

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(validate, "check_scan_args", counting)
    gla = [x.detach() for x in gla_inputs(1, 5, 2, 1, 4, 3)]
    dr = [x.detach() for x in delta_inputs(1, 5, 2, 1, 4, 3, "near1")]
    for fn, args in ((ops.chunk_gla, gla), (ops.recurrent_gla, gla),
                     (ops.chunk_delta_rule, dr), (ops.recurrent_delta_rule, dr)):
        calls.clear()
        fn(*args)
        assert len(calls) == 1, f"{fn.__name__}: {len(calls)} checks"


# ------------------------------------------------------------------ the prepared GPU check


def test_gpu_check_script_dry_run(tmp_path):
    """The recurrence step of benchmarks/gpu_kernels.sh (its Python, run as the script runs it) on
    CPU at small sizes, the torch forms standing in for fla; and the script parses."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_kernels.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    start = text.index("<<'PYEOF'\n") + len("<<'PYEOF'\n")
    source = text[start:text.index("\nPYEOF\n", start)]
    env = {**os.environ, "DRY": "1"}
    env.pop("DISTILL_BACKEND", None)
    run = subprocess.run([sys.executable, "-", str(tmp_path)], input=source, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads((tmp_path / "recurrences.json").read_text())
    assert report["checks"] and all(c.get("ok") for c in report["checks"]), report["checks"]
    assert {t["op"] for t in report["timings"]} == {"chunk_linear_attn", "gla", "gla_strong", "delta", "gated_delta"}
    assert not [t for t in report["timings"] if "error" in t]
    assert "| gla | torch |" in (tmp_path / "recurrences.md").read_text()
