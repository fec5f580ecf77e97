"""Argument checks shared by the scan entry points: raise ``ValueError`` before anything launches.

Each message names the argument, the expected shape in ``[B, T, H, D]`` terms with the sizes
implied by the other arguments, and what was passed.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KERNEL_DTYPES = FLOAT_DTYPES[:3]  # what the Triton kernels load (they compute in fp32)


def _fail(name: str, expected: str, x: torch.Tensor) -> None:
    raise ValueError(f"{name} must be {expected}, got shape {tuple(x.shape)} ({x.dtype}, {x.device})")


def _check_float(name: str, x: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {', '.join(str(d).split('.')[-1] for d in dtypes)}, got {x.dtype}")


def check_scan_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    *,
    state_dim: int | None = None,
    unit_stride: bool = False,
    names: tuple[str, str] = ("q", "k"),
) -> tuple[int, int, int, int, int, int]:
    """Check q [B,T,H,F], k [B,T,Hk,F], v [B,T,Hk,Dv], log_decay [Hk], initial_state [B,Hk,S,Dv].

    ``state_dim`` is S (defaults to F; the polynomial scan passes its expanded size).
    ``unit_stride`` is what the Triton kernels need: stride 1 on the last dim of q, k, v (other
    strides may be anything) and no float64. q and k must share a dtype; v may differ (the layer passes
    an fp32 v with its ones column). Returns (B, T, H, Hk, F, Dv)."""
    qn, kn = names
    for name, x in ((qn, q), (kn, k), ("v", v)):
        _check_float(name, x, KERNEL_DTYPES if unit_stride else FLOAT_DTYPES)
        if x.dim() != 4:
            _fail(name, "4-D [B, T, heads, dim]", x)
    B, T, H, F = q.shape
    Hk = k.shape[2]
    if k.shape[:2] != (B, T) or k.shape[3] != F or Hk == 0 or H % Hk:
        _fail(kn, f"[B, T, Hk, F] = [{B}, {T}, Hk, {F}] with Hk dividing H={H}", k)
    Dv = v.shape[3]
    if v.shape[:3] != (B, T, Hk):
        _fail("v", f"[B, T, Hk, Dv] = [{B}, {T}, {Hk}, Dv]", v)
    if k.dtype != q.dtype:
        raise ValueError(f"{kn} must have the dtype of {qn} ({q.dtype}), got {k.dtype}")
    device = q.device
    for name, x in ((kn, k), ("v", v), ("log_decay", log_decay), ("initial_state", initial_state)):
        if x is not None and x.device != device:
            raise ValueError(f"{name} must be on {qn}'s device {device}, got {x.device}")
    if log_decay is not None:
        _check_float("log_decay", log_decay)
        if tuple(log_decay.shape) != (Hk,):
            _fail("log_decay", f"[Hk] = [{Hk}] (one log-decay per kv head)", log_decay)
    S = F if state_dim is None else state_dim
    if initial_state is not None:
        _check_float("initial_state", initial_state)
        if tuple(initial_state.shape) != (B, Hk, S, Dv):
            _fail("initial_state", f"[B, Hk, F, Dv] = [{B}, {Hk}, {S}, {Dv}]", initial_state)
    if unit_stride:
        for name, x in ((qn, q), (kn, k), ("v", v)):
            if x.numel() and x.stride(-1) != 1:
                raise ValueError(
                    f"{name} must have stride 1 on its last dim for the Triton kernels, got strides "
                    f"{x.stride()}; call .contiguous() first"
                )
    return B, T, H, Hk, F, Dv


def _check_gate(name: str, x: torch.Tensor | None, shape: tuple[int, ...], expected: str, device) -> None:
    """A gate tensor (log_alpha, beta): a float tensor on ``device`` of exactly ``shape``."""
    if x is None:
        return
    _check_float(name, x)
    if tuple(x.shape) != shape:
        _fail(name, expected, x)
    if x.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {x.device}")


def check_gla_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    unit_stride: bool = False,
    per_feature: bool = True,
) -> tuple[int, int, int, int, int, int]:
    """Check the GLA arguments: q, k, v, initial_state as :func:`check_scan_args` (no log_decay) and
    log_alpha (required): [B, T, Hk, F], one log-gate per kv head, token and key feature, or with
    ``per_feature=False`` [B, T, Hk], one per kv head and token. Values (log_alpha <= 0) are not
    checked: that would sync the device. Returns (B, T, H, Hk, F, Dv)."""
    B, T, H, Hk, F, Dv = check_scan_args(q, k, v, None, initial_state, unit_stride=unit_stride)
    shape, names = ((B, T, Hk, F), "B, T, Hk, F") if per_feature else ((B, T, Hk), "B, T, Hk")
    expected = f"[{names}] = [{', '.join(map(str, shape))}]"
    if log_alpha is None:
        raise ValueError(f"log_alpha must be {expected}, got None")
    what = "kv head, token and key feature" if per_feature else "kv head and token"
    _check_gate("log_alpha", log_alpha, shape, f"{expected} (one log-gate per {what})", q.device)
    return B, T, H, Hk, F, Dv


def check_delta_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_alpha: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    *,
    unit_stride: bool = False,
) -> tuple[int, int, int, int, int, int]:
    """Check the (gated) delta-rule arguments: q, k, v, initial_state as :func:`check_scan_args` (no
    log_decay), beta [B, T, Hk] (required) and log_alpha [B, T, Hk] or None, one scalar per kv head
    and token. Values (0 < beta < 1, log_alpha <= 0, unit-norm k) are not checked: that would sync
    the device. Returns (B, T, H, Hk, F, Dv)."""
    B, T, H, Hk, F, Dv = check_scan_args(q, k, v, None, initial_state, unit_stride=unit_stride)
    if beta is None:
        raise ValueError(f"beta must be [B, T, Hk] = [{B}, {T}, {Hk}], got None")
    _check_gate("beta", beta, (B, T, Hk), f"[B, T, Hk] = [{B}, {T}, {Hk}] (one write strength per kv head and token)",
                q.device)
    _check_gate("log_alpha", log_alpha, (B, T, Hk),
                f"[B, T, Hk] = [{B}, {T}, {Hk}] (one log-gate per kv head and token)", q.device)
    return B, T, H, Hk, F, Dv
