"""Linear-attention ops on tensors, installed as ``distill_kernels``.

Public entry points pick an implementation by ``DISTILL_BACKEND`` (``auto|torch|triton|fla``):
``auto`` is Triton on CUDA tensors and PyTorch elsewhere; ``triton`` also runs CPU tensors when
``TRITON_INTERPRET=1`` was set before the first call; ``fla`` runs flash-linear-attention on CUDA.
A backend that cannot run on the tensors' device raises ``ValueError``. The choice is made once
per (``DISTILL_BACKEND`` value, device type) and cached; the arguments are checked once per call,
here, and the backend's functions trust that check.

    chunk_linear_attn(q, k, v, log_decay=None, initial_state=None) -> (o, final_state)
    recurrent_linear_attn(q, k, v, log_decay=None, initial_state=None, inplace=False) -> (o, final_state)
    chunk_poly_attn(q_proj, k_proj, v, coeffs, log_decay=None, initial_state=None) -> (o, final_state)
    recurrent_poly_attn(q_proj, k_proj, v, coeffs, log_decay=None, initial_state=None, inplace=False)
    chunk_gla(q, k, v, log_alpha, initial_state=None) -> (o, final_state)
    recurrent_gla(q, k, v, log_alpha, initial_state=None, inplace=False) -> (o, final_state)
    chunk_head_gla(q, k, v, log_alpha, initial_state=None) -> (o, final_state)
    chunk_delta_rule(q, k, v, beta, log_alpha=None, initial_state=None) -> (o, final_state)
    recurrent_delta_rule(q, k, v, beta, log_alpha=None, initial_state=None, inplace=False) -> (o, final_state)

Shapes: q [B,T,H,F], k [B,T,Hk,F], v [B,T,Hk,Dv], log_decay [Hk], state [B,Hk,F,Dv] (fp32);
q_proj [B,T,H,r], k_proj [B,T,Hk,r], coeffs [H,p+1] (state layout: :mod:`distill_kernels.poly`);
GLA log_alpha [B,T,Hk,F] (``chunk_head_gla``: [B,T,Hk]); delta rule beta [B,T,Hk], log_alpha [B,T,Hk] (rules: :mod:`.gated`, :mod:`.delta`).

The gated and delta-rule recurrences run the torch path (:mod:`.gated`, :mod:`.delta`) on every
backend that has no kernel for them (``Backend.chunk_gla`` ... left None): under ``auto`` that is
torch on CPU and on CUDA alike; ``DISTILL_BACKEND=fla`` runs fla's kernels (CUDA only).
"""
from __future__ import annotations

import logging
import os
from typing import Callable, NamedTuple

import torch

from . import delta, gated, poly
from .chunk import chunk_linear_attn as torch_chunk_linear_attn
from .delta import naive_delta_rule
from .gated import naive_gla
from .naive import naive_linear_attn
from .poly import poly_feature_dim, poly_features
from .recurrent import recurrent_linear_attn as torch_recurrent_linear_attn
from .validate import check_delta_args, check_gla_args, check_scan_args

logger = logging.getLogger(__name__)


class Backend(NamedTuple):
    """One implementation's functions. They trust their caller: the entry points below check the
    arguments first (stride 1 on the last dim and no float64 too where ``unit_stride``).
    ``chunk`` and ``recurrent`` follow :func:`naive_linear_attn`; ``chunk_poly`` follows
    :func:`chunk_poly_attn` (None: materialise the features and use ``chunk``). The gated and
    delta-rule functions follow :func:`naive_gla` and :func:`naive_delta_rule` (None: the torch path)."""

    chunk: Callable
    recurrent: Callable
    chunk_poly: Callable | None = None
    recurrent_inplace: bool = False  # recurrent takes ``inplace=`` itself
    unit_stride: bool = False  # what the Triton kernels need (see ``check_scan_args``)
    chunk_gla: Callable | None = None
    recurrent_gla: Callable | None = None
    chunk_head_gla: Callable | None = None
    chunk_delta_rule: Callable | None = None
    recurrent_delta_rule: Callable | None = None


# The torch paths of the gated and delta-rule recurrences, also what a backend without its own
# kernels for them runs (the Triton backend, today).
_TORCH_RECURRENCES = dict(
    chunk_gla=gated.chunk_gla,
    recurrent_gla=gated.recurrent_gla,
    chunk_head_gla=gated.chunk_head_gla,
    chunk_delta_rule=delta.chunk_delta_rule,
    recurrent_delta_rule=delta.recurrent_delta_rule,
)


def _load_torch() -> Backend:
    return Backend(torch_chunk_linear_attn, torch_recurrent_linear_attn, poly.chunk_poly_attn, **_TORCH_RECURRENCES)


def _load_triton() -> Backend:
    from . import triton_chunk, triton_recurrent

    def chunk_poly(q_proj, k_proj, v, coeffs, log_decay=None, initial_state=None):
        degree = coeffs.shape[-1] - 1
        if degree <= triton_chunk.MAX_POLY_DEGREE:
            return triton_chunk.chunk_poly_attn_unchecked(q_proj, k_proj, v, coeffs, log_decay, initial_state)
        logger.debug("polynomial degree %d > %d: materialising the features", degree, triton_chunk.MAX_POLY_DEGREE)
        scan = triton_chunk.chunk_linear_attn_unchecked
        return poly.chunk_poly_attn(q_proj, k_proj, v, coeffs, log_decay, initial_state, scan=scan)

    return Backend(
        triton_chunk.chunk_linear_attn_unchecked,
        triton_recurrent.recurrent_linear_attn_unchecked,
        chunk_poly,
        recurrent_inplace=True,
        unit_stride=True,
    )


def _check_triton(device: torch.device) -> None:
    try:
        from . import triton_chunk
    except ImportError as err:
        raise ValueError(f"DISTILL_BACKEND=triton but Triton cannot be imported ({err}); use torch") from None
    try:
        triton_chunk.check_device(device)
    except ValueError as err:
        raise ValueError(f"DISTILL_BACKEND=triton cannot run here: {err}") from None


def _load_fla() -> Backend:
    from . import fla_backend

    return Backend(
        fla_backend.chunk_linear_attn_unchecked,
        fla_backend.recurrent_linear_attn_unchecked,
        chunk_gla=fla_backend.chunk_gla_unchecked,
        recurrent_gla=fla_backend.recurrent_gla_unchecked,
        chunk_delta_rule=fla_backend.chunk_delta_rule_unchecked,
        recurrent_delta_rule=fla_backend.recurrent_delta_rule_unchecked,
    )


def _check_fla(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(
            f"DISTILL_BACKEND=fla needs CUDA tensors (fla's chunk kernels do not run on {device.type}); "
            "use DISTILL_BACKEND=torch, or triton with TRITON_INTERPRET=1"
        )
    try:
        import fla.ops.simple_gla  # noqa: F401
    except ImportError as err:
        raise ValueError(f"DISTILL_BACKEND=fla but flash-linear-attention cannot be imported ({err})") from None


# name -> (loader, device check); loaders run lazily so importing this package stays cheap.
_REGISTRY: dict[str, tuple[Callable[[], Backend | tuple], Callable[[torch.device], None] | None]] = {}
_LOADED: dict[str, Backend] = {}
# (DISTILL_BACKEND as set, device type) -> backend: the environment is read on every call, resolved once.
_RESOLVED: dict[tuple[str, str], Backend] = {}


def register_backend(
    name: str,
    loader: Callable[[], Backend | tuple],
    check_device: Callable[[torch.device], None] | None = None,
) -> None:
    """Register ``loader() -> Backend`` (or the tuple ``(chunk_fn, recurrent_fn[, chunk_poly_fn])``)
    under ``name``; the functions get arguments already checked by the entry points.
    ``check_device(device)`` raises ``ValueError`` when the backend cannot run there."""
    if name in _REGISTRY:
        raise ValueError(f"backend {name!r} is already registered")
    _REGISTRY[name] = (loader, check_device)


register_backend("torch", _load_torch)
register_backend("triton", _load_triton, _check_triton)
register_backend("fla", _load_fla, _check_fla)


def resolve_backend(device: torch.device) -> str:
    """The backend ``DISTILL_BACKEND`` selects for tensors on ``device``; ValueError if it cannot run there.
    Checks afresh on every call; :func:`get_backend` caches its answer."""
    device = torch.device(device)
    name = os.environ.get("DISTILL_BACKEND", "auto").strip().lower() or "auto"
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        try:
            _check_triton(device)
        except ValueError:
            return "torch"
        return "triton"
    if name not in _REGISTRY:
        raise ValueError(f"DISTILL_BACKEND={name!r} is unknown; choose one of auto, {', '.join(_REGISTRY)}")
    check = _REGISTRY[name][1]
    if check is not None:
        check(device)
    return name


def get_backend(device: torch.device) -> Backend:
    """The functions for tensors on ``device``, resolved once per (``DISTILL_BACKEND``, device type)."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    key = (os.environ.get("DISTILL_BACKEND", "auto"), device_type)
    backend = _RESOLVED.get(key)
    if backend is None:
        name = resolve_backend(device)
        if name not in _LOADED:
            _LOADED[name] = Backend(*_REGISTRY[name][0]())
        backend = _RESOLVED[key] = _LOADED[name]
        logger.debug("DISTILL_BACKEND=%r on %s tensors: the %s backend", key[0], device_type, name)
    return backend


def _backend_for(x, name: str) -> Backend:
    """The backend for ``x``'s device. It is picked before the arguments are checked, since what the
    check demands depends on it (``Backend.unit_stride``)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return get_backend(x.device)


def chunk_linear_attn(q, k, v, log_decay=None, initial_state=None):
    """q [B,T,H,F], k [B,T,Hk,F], v [B,T,Hk,Dv], log_decay [Hk], initial_state [B,Hk,F,Dv]
    -> o [B,T,H,Dv] fp32, final state [B,Hk,F,Dv] fp32 (training and prefill)."""
    backend = _backend_for(q, "q")
    check_scan_args(q, k, v, log_decay, initial_state, unit_stride=backend.unit_stride)
    return backend.chunk(q, k, v, log_decay=log_decay, initial_state=initial_state)


def _write_back(initial_state, state, inplace: bool):
    """For ``inplace``: copy the new state into ``initial_state`` and return that, unless autograd
    records the call (then the fresh state is returned)."""
    if inplace and initial_state is not None and state is not initial_state and not state.requires_grad:
        initial_state.copy_(state)
        return initial_state
    return state


def _recurrent(backend: Backend, q, k, v, log_decay, initial_state, inplace: bool):
    """``backend.recurrent`` on checked arguments; copies the state back for ``inplace`` where the
    backend cannot write it in place itself."""
    if backend.recurrent_inplace:
        return backend.recurrent(q, k, v, log_decay=log_decay, initial_state=initial_state, inplace=inplace)
    o, state = backend.recurrent(q, k, v, log_decay=log_decay, initial_state=initial_state)
    return o, _write_back(initial_state, state, inplace)


def recurrent_linear_attn(q, k, v, log_decay=None, initial_state=None, inplace: bool = False):
    """Same contract as :func:`chunk_linear_attn`, token by token (decode). ``inplace=True`` writes
    the new state into ``initial_state`` and returns it (decoding, under ``torch.no_grad()``; when
    autograd records the call, a fresh state is returned instead)."""
    backend = _backend_for(q, "q")
    check_scan_args(q, k, v, log_decay, initial_state, unit_stride=backend.unit_stride)
    return _recurrent(backend, q, k, v, log_decay, initial_state, inplace)


def chunk_poly_attn(q_proj, k_proj, v, coeffs, log_decay=None, initial_state=None):
    """Polynomial-kernel scan, φ(q)·φ(k) = Σ_i c_{h,i} (q̃·k̃)^i. q_proj [B,T,H,r], k_proj [B,T,Hk,r],
    v [B,T,Hk,Dv], coeffs [H,p+1] -> o [B,T,H,Dv] fp32, final state [B,Hk,F,Dv] fp32 with F and
    the row layout of :mod:`distill_kernels.poly`. Triton fuses the feature map for p <= 2."""
    backend = _backend_for(q_proj, "q_proj")
    poly.check_poly_args(q_proj, k_proj, v, coeffs, log_decay, initial_state, unit_stride=backend.unit_stride)
    if backend.chunk_poly is not None:
        return backend.chunk_poly(q_proj, k_proj, v, coeffs, log_decay=log_decay, initial_state=initial_state)
    return poly.chunk_poly_attn(q_proj, k_proj, v, coeffs, log_decay, initial_state, scan=backend.chunk)


def recurrent_poly_attn(q_proj, k_proj, v, coeffs, log_decay=None, initial_state=None, inplace: bool = False):
    """Decode step of :func:`chunk_poly_attn`: the few new tokens' features are materialised."""
    backend = _backend_for(q_proj, "q_proj")
    degree = poly.check_poly_args(q_proj, k_proj, v, coeffs, log_decay, initial_state, unit_stride=backend.unit_stride)
    phi_q = poly_features(q_proj, degree, coeffs)  # (B, T, H, F)
    phi_k = poly_features(k_proj, degree)  # (B, T, Hk, F)
    return _recurrent(backend, phi_q, phi_k, v, log_decay, initial_state, inplace)


def _recurrence(backend: Backend, name: str) -> Callable:
    """``backend``'s function ``name`` for a gated / delta-rule recurrence, else the torch path."""
    return getattr(backend, name) or _TORCH_RECURRENCES[name]


def chunk_gla(q, k, v, log_alpha, initial_state=None):
    """Gated linear attention (Yang et al. 2024), training and prefill:
    S_t = diag(exp(log_alpha_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t (no scaling: the caller scales q).
    q [B,T,H,F], k [B,T,Hk,F], v [B,T,Hk,Dv], log_alpha [B,T,Hk,F] (<= 0), initial_state [B,Hk,F,Dv]
    -> o [B,T,H,Dv] fp32, final state [B,Hk,F,Dv] fp32. Padding tokens: k = 0, log_alpha = 0."""
    backend = _backend_for(q, "q")
    check_gla_args(q, k, v, log_alpha, initial_state)
    return _recurrence(backend, "chunk_gla")(q, k, v, log_alpha, initial_state)


def recurrent_gla(q, k, v, log_alpha, initial_state=None, inplace: bool = False):
    """Same contract as :func:`chunk_gla`, token by token (decode); ``inplace`` as in
    :func:`recurrent_linear_attn`."""
    backend = _backend_for(q, "q")
    check_gla_args(q, k, v, log_alpha, initial_state)
    o, state = _recurrence(backend, "recurrent_gla")(q, k, v, log_alpha, initial_state)
    return o, _write_back(initial_state, state, inplace)


def chunk_head_gla(q, k, v, log_alpha, initial_state=None):
    """:func:`chunk_gla` with one gate per kv head and token, shared by the key features:
    log_alpha [B,T,Hk] (<= 0); the rest as :func:`chunk_gla` (decode: :func:`recurrent_gla` with
    the gate expanded over F). Cheaper than expanding the gate for :func:`chunk_gla`: the decay
    inside a chunk is one [C, C] matrix per kv head."""
    backend = _backend_for(q, "q")
    check_gla_args(q, k, v, log_alpha, initial_state, per_feature=False)
    return _recurrence(backend, "chunk_head_gla")(q, k, v, log_alpha, initial_state)


def chunk_delta_rule(q, k, v, beta, log_alpha=None, initial_state=None):
    """Delta rule (DeltaNet, Yang et al. 2024) or, with ``log_alpha``, gated delta rule (Yang et al.
    2025), training and prefill: S_t = exp(log_alpha_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
    o_t = S_t^T q_t. k must be L2-normalised by the caller; nothing is scaled.
    q [B,T,H,F], k [B,T,Hk,F], v [B,T,Hk,Dv], beta [B,T,Hk] in (0,1), log_alpha [B,T,Hk] (<= 0) or None,
    initial_state [B,Hk,F,Dv] -> o [B,T,H,Dv] fp32, final state [B,Hk,F,Dv] fp32.
    Padding tokens: beta = 0, log_alpha = 0 (and k = 0)."""
    backend = _backend_for(q, "q")
    check_delta_args(q, k, v, beta, log_alpha, initial_state)
    return _recurrence(backend, "chunk_delta_rule")(q, k, v, beta, log_alpha, initial_state)


def recurrent_delta_rule(q, k, v, beta, log_alpha=None, initial_state=None, inplace: bool = False):
    """Same contract as :func:`chunk_delta_rule`, token by token (decode); ``inplace`` as in
    :func:`recurrent_linear_attn`."""
    backend = _backend_for(q, "q")
    check_delta_args(q, k, v, beta, log_alpha, initial_state)
    o, state = _recurrence(backend, "recurrent_delta_rule")(q, k, v, beta, log_alpha, initial_state)
    return o, _write_back(initial_state, state, inplace)


__all__ = [
    "Backend",
    "chunk_delta_rule",
    "chunk_gla",
    "chunk_head_gla",
    "chunk_linear_attn",
    "chunk_poly_attn",
    "get_backend",
    "naive_delta_rule",
    "naive_gla",
    "naive_linear_attn",
    "poly_feature_dim",
    "poly_features",
    "recurrent_delta_rule",
    "recurrent_gla",
    "recurrent_linear_attn",
    "recurrent_poly_attn",
    "register_backend",
    "resolve_backend",
    "torch_chunk_linear_attn",
    "torch_recurrent_linear_attn",
]
