"""One linear-RNN sublayer: feature map + optional decay over the shared ops in ``distill_kernels``.

Normalised causal linear attention (Katharopoulos et al., 2020):

    S_t = γ S_{t-1} + φ(k_t) v_tᵀ,   z_t = γ z_{t-1} + φ(k_t),   y_t = φ(q_t)ᵀS_t / (φ(q_t)ᵀz_t + ε)

S and z are kept as one state ``[B, Hk, F, D+1]``: a ones column appended to v carries z.
"""
from __future__ import annotations

import math

import torch
from torch import nn

import distill_kernels as ops

from .config import ConvertConfig
from .feature_maps import build_feature_map
from .feature_maps.builtin import PolynomialKernel


def fixed_log_decay(num_heads: int) -> torch.Tensor:
    """Per-head γ spread geometrically from 1 − 1/32 to 1 − 1/512 (RetNet-like), as log γ [h]."""
    gaps = torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), num_heads))
    return torch.log1p(-gaps)


class LinearRNN(nn.Module):
    """φ for queries (``num_heads``) and keys (``num_kv_heads``), and the decay of the state."""

    def __init__(self, cfg: ConvertConfig, head_dim: int, num_heads: int, num_kv_heads: int):
        super().__init__()
        self.feature_map = build_feature_map(cfg.feature_map, cfg.feature_map_kwargs, head_dim, num_heads, num_kv_heads)
        self.decay_mode = cfg.decay
        if cfg.decay == "fixed":
            self.register_buffer("fixed_log_decay", fixed_log_decay(num_kv_heads))
        elif cfg.decay == "learned":
            # γ = sigmoid(logit); starts at the fixed schedule.
            gamma = fixed_log_decay(num_kv_heads).exp()
            self.decay_logit = nn.Parameter(torch.log(gamma) - torch.log1p(-gamma))

    def log_decay(self) -> torch.Tensor | None:
        """log γ per kv head [Hk], or None."""
        if self.decay_mode == "fixed":
            return self.fixed_log_decay
        if self.decay_mode == "learned":
            return nn.functional.logsigmoid(self.decay_logit)
        return None

    def scan(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        valid: torch.Tensor | None,
        state: torch.Tensor | None,
        recurrent: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B,T,H,D], k/v [B,T,Hk,D] (before φ), valid [B,T] bool (False = padding, which never
        enters the state) -> o [B,T,H,D+1] fp32 (numerator, then normaliser), state [B,Hk,F,D+1]."""
        v1 = torch.cat([v.float(), v.new_ones(*v.shape[:-1], 1, dtype=torch.float32)], dim=-1)  # (B,T,Hk,D+1)
        if valid is not None:
            v1 = v1 * valid[:, :, None, None]  # a zero value row adds nothing to S or z
        fm, log_decay = self.feature_map, self.log_decay()
        if isinstance(fm, PolynomialKernel):  # features stay unexpanded until the scan
            op = ops.recurrent_poly_attn if recurrent else ops.chunk_poly_attn
            return op(fm.project_q(q), fm.project_k(k), v1, fm.coeffs, log_decay=log_decay, initial_state=state)
        op = ops.recurrent_linear_attn if recurrent else ops.chunk_linear_attn
        return op(fm.phi_q(q), fm.phi_k(k), v1, log_decay=log_decay, initial_state=state)
