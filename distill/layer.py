"""The replacement for one softmax attention layer: stacked linear-RNN sublayers.

Sublayer 1 reuses the teacher's q/k/v/o projections (or its fused qkv projection), q/k norms,
RoPE and GQA (the modules are shared, not copied). With queries q_t, keys k_s and values v_s
after RoPE:

    window = 0:   y_t = φ(q_t)ᵀS_t / (φ(q_t)ᵀz_t + ε)        (normalised causal linear attention)
    window = w:   y_t = (Σ_{t-w<s≤t} e^{s_ts − m_t} v_s + e^{log g_h − m_t} φ(q_t)ᵀS_{t−w})
                        / (Σ_{t-w<s≤t} e^{s_ts − m_t}     + e^{log g_h − m_t} φ(q_t)ᵀz_{t−w} + ε)

φ reads q and k after RoPE; with ``linear_rope: false`` it reads them before RoPE (the exact
parts keep RoPE), so that the linear part sees no positions and the layer, like its teacher,
depends on relative positions only. Here s_ts = q_t·k_s·scale (the teacher's scale, capped as
c·tanh(s/c) where the teacher soft-caps its attention logits, Gemma 2; the linear part then
approximates the capped scores),
S/z sum only keys older than the window, and g_h = exp(log_mix_h) is a learned per-head mixing
factor (LoLCATs-style hybrid, one shared normalisation). The shift m_t is the larger of the
window's top score and log(g_h φ(q_t)ᵀz_{t−w}), so that the larger of the two parts is 1: the
denominator is then at least 1, ε never dominates, and no factor overflows (e^{log g − m} is
computed as one exponent). A per-kv-head decay γ multiplies S and z at each
step when enabled. With ``sparse_cache = M`` (:mod:`distill.sparse_cache`, LoLA) the exact part
also holds up to M older keys per kv head, the ones the linear state recalls worst, and S/z leave
them out.

Sublayer j ≥ 2 reads the previous sublayer's per-head output y^{j−1} [B,T,H,D]:

    y^j = y^{j−1} + W_o^j · LinAttn(φ_j(W_q^j y^{j−1}), φ_j(W_k^j y^{j−1}), W_v^j y^{j−1})

with per-head D×D projections (W_q, W_k, W_v start as the identity, W_o as zero, so a deeper
stack starts exactly equal to depth 1), its own feature map, decay and recurrent state, and no
window. The layer returns o_proj(y^depth).

Modes (``distill_mode=`` on the model's forward, or ``mode=`` here) are explicit:
``auto`` (chunked for prefill, recurrent for one token), ``parallel``, ``recurrent`` and
``teacher`` (the teacher's own softmax attention from the shared projections).
"""
from __future__ import annotations

import torch
from torch import nn

from .cache import RecurrentLayer
from .fp32 import KeepFloat32
from .rnn import LinearRNN, RNNSpec
from .softmax import mix_exact_linear, softmax_attention, teacher_mask, window_softmax
from .sparse_cache import sparse_hybrid

MODES = ("auto", "parallel", "recurrent", "teacher")
SHARED_MODULES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "q_norm", "k_norm")  # the teacher's, not copies


class StackSublayer(nn.Module):
    """Sublayer j ≥ 2: a residual linear-attention correction over the previous output."""

    def __init__(self, spec: RNNSpec, head_dim: int, num_heads: int):
        super().__init__()
        self.rnn = LinearRNN(spec, head_dim, num_heads, num_heads)
        eye = torch.eye(head_dim).repeat(num_heads, 1, 1)  # (H, D, D)
        self.w_q, self.w_k, self.w_v = (nn.Parameter(eye.clone()) for _ in range(3))
        self.w_o = nn.Parameter(torch.zeros_like(eye))

    def forward(self, x, valid, state, recurrent: bool, eps: float):
        """x [B,T,H,D] fp32 -> (x + correction [B,T,H,D] fp32, state [B,H,F,D+1])."""
        xw = x.to(self.w_q.dtype)
        q, k, v = (torch.einsum("bthd,hde->bthe", xw, w) for w in (self.w_q, self.w_k, self.w_v))
        o, state = self.rnn.scan(q, k, v, valid, state, recurrent)
        u = o[..., :-1] / (o[..., -1:] + eps)  # (B, T, H, D)
        return x + torch.einsum("bthd,hde->bthe", u, self.w_o.float()), state


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x [B,T,H,D], cos/sin [B|1,T,R] -> [B,T,H,D]. With R < D (partial rotary,
    Phi-3's ``partial_rotary_factor``) only the first R channels turn; the rest pass through."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, R)
    R = cos.shape[-1]
    if R == x.shape[-1]:
        return ((x * cos) + (rotate_half(x) * sin)).to(x.dtype)
    turned, rest = x[..., :R], x[..., R:]
    return torch.cat([(turned * cos) + (rotate_half(turned) * sin), rest], dim=-1).to(x.dtype)


class LinearAttention(KeepFloat32):
    """Drop-in replacement for a decoder layer's ``self_attn`` (see the module docstring).

    attn: the teacher's attention module (its projections and q/k norms are shared, not copied);
    rnn: each sublayer's feature map and decay; depth: sublayers; window: the student's exact
    softmax window (0 = pure linear). The rest are the family's facts for this layer
    (:meth:`distill.architectures.Architecture.layer_options`): teacher_sliding_window: the
    teacher's own sliding window (None = full causal attention); qk_norm: None, ``"head"`` (per-head
    norms on [B,T,H,D]) or ``"flat"`` (norms on the flat projections [B,T,H·D]); fused_qkv: ``attn``
    has one ``qkv_proj`` with rows [q | k | v]; softcap: the teacher's attention-logit cap (None =
    none); use_rope: whether this layer rotates q and k; rope_key: which entry of a per-layer-type
    RoPE mapping is this layer's (None = RoPE comes as one (cos, sin)); linear_rope: whether the
    feature maps read q and k after RoPE (True) or before it (False, see :meth:`feature_inputs`).
    """

    float32_tensors = ("log_mix",)

    def __init__(
        self,
        attn: nn.Module,
        layer_idx: int,
        rnn: RNNSpec,
        *,
        num_heads: int,
        num_kv_heads: int,
        depth: int = 1,
        window: int = 0,
        eps: float = 1e-6,
        teacher_sliding_window: int | None = None,
        qk_norm: str | None = None,
        fused_qkv: bool = False,
        softcap: float | None = None,
        use_rope: bool = True,
        rope_key: str | None = None,
        sparse_cache: int = 0,
        linear_rope: bool = True,
    ):
        super().__init__()
        self.teacher_class = type(attn)  # to give the layer its softmax attention back (restore_softmax)
        self.layer_idx = layer_idx
        self.head_dim = attn.head_dim
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.scaling = attn.scaling
        self.teacher_sliding_window = teacher_sliding_window
        self.window, self.eps, self.depth = window, eps, depth
        self.sparse_cache = sparse_cache  # LoLA's M (distill.sparse_cache); 0 = off; set after training
        self.qk_norm, self.fused_qkv, self.softcap = qk_norm, fused_qkv, softcap
        self.use_rope, self.rope_key = use_rope, rope_key
        # The feature maps read q/k before RoPE (the linear part sees no positions): the layer then
        # unrotates the rotated q/k it is given and keeps its cached keys in both forms.
        self.unrotates = use_rope and not linear_rope
        # Shared with the teacher: same Parameter objects, same state-dict names.
        if fused_qkv:
            self.qkv_proj = attn.qkv_proj
            self.qkv_sizes = [num_heads * self.head_dim, num_kv_heads * self.head_dim, num_kv_heads * self.head_dim]
        else:
            self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
        self.o_proj = attn.o_proj
        if qk_norm:
            self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.rnn = LinearRNN(rnn, self.head_dim, num_heads, num_kv_heads)
        if window:
            self.log_mix = nn.Parameter(torch.zeros(num_heads, dtype=torch.float32))  # g_h = exp(log_mix)
        self.stack = nn.ModuleList(StackSublayer(rnn, self.head_dim, num_heads) for _ in range(depth - 1))

    def project(self, hidden_states, position_embeddings):
        """hidden [B,T,hidden] -> q [B,T,H,D], k [B,T,Hk,D] (normed, rotated), v [B,T,Hk,D].

        position_embeddings: (cos, sin) [B|1,T,R] each, or a dict of them keyed by layer type
        (Gemma 3's local and global RoPE), from which the layer takes its ``rope_key`` entry."""
        B, T, _ = hidden_states.shape
        if self.fused_qkv:  # views of one output, the shared weight is not split or copied
            q, k, v = self.qkv_proj(hidden_states).split(self.qkv_sizes, dim=-1)  # (B, T, H·D), (B, T, Hk·D) x2
        else:
            q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        if self.qk_norm == "flat":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            cos, sin = self._rope(position_embeddings)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def _rope(self, position_embeddings):
        return position_embeddings[self.rope_key] if isinstance(position_embeddings, dict) else position_embeddings

    def feature_inputs(self, q, k, position_embeddings=None):
        """What the feature maps read: q [B,T,H,D], k [B,T,Hk,D] as :meth:`project` gives them
        (rotated), or, with ``linear_rope: false``, turned back by the same RoPE (whose
        ``position_embeddings`` are then required): the linear part then sees no positions, so
        the layer depends on relative positions only, as softmax attention does."""
        if not self.unrotates:
            return q, k
        if position_embeddings is None:
            raise ValueError(
                f"layer {self.layer_idx} reads q/k before RoPE (linear_rope: false): pass the RoPE (cos, sin) of these tokens"
            )
        cos, sin = self._rope(position_embeddings)
        return apply_rope(q, cos, -sin), apply_rope(k, cos, -sin)

    def teacher_attention(self, q, k, v, valid=None):
        """The teacher's softmax attention: [B,T,H,D] x2 -> y [B,T,H,D]."""
        mask = teacher_mask(q.shape[1], valid, self.teacher_sliding_window, q.device)
        return softmax_attention(q, k, v, mask, self.scaling, self.softcap)

    def student_attention(
        self, q, k, v, valid=None, layer_cache: RecurrentLayer | None = None, recurrent=False, position_embeddings=None
    ):
        """q [B,T,H,D], k/v [B,T,Hk,D], valid [B,T] -> y [B,T,H,D] fp32; updates ``layer_cache``.
        ``position_embeddings``: the RoPE of these tokens, needed with ``linear_rope: false``."""
        states = layer_cache.states if layer_cache is not None and layer_cache.states else [None] * self.depth
        recent = sparse = None
        qf, kf = self.feature_inputs(q, k, position_embeddings)
        if not self.window:
            o, state = self.rnn.scan(qf, kf, v, valid, states[0], recurrent)  # (B, T, H, D+1)
            y = o[..., :-1] / (o[..., -1:] + self.eps)
        elif self.sparse_cache:
            y, state, recent, sparse = sparse_hybrid(self, q, k, v, valid, layer_cache, states[0], recurrent, qf, kf)
        else:
            y, state, recent = self._hybrid(q, k, v, valid, layer_cache, states[0], recurrent, qf, kf)
        new_states = [state]
        for sub, sub_state in zip(self.stack, states[1:]):
            y, sub_state = sub(y, valid, sub_state, recurrent, self.eps)
            new_states.append(sub_state)
        if layer_cache is not None:
            layer_cache.store(new_states, recent, q.shape[1], sparse)
        return y

    def _evicted_scan(self, q, k_all, v_all, valid_all, state, recurrent):
        """The linear part of a hybrid: keys leave the window w steps after they arrive, so the
        state reads the stream k_all [B,w+T,Hk,D] shifted by w. -> o [B,T,H,D+1], state."""
        T, w = q.shape[1], self.window
        o_lin, state = self.rnn.scan(q, k_all[:, :T], v_all[:, :T], valid_all[:, :T], state, recurrent)
        log_decay = self.rnn.log_decay()
        if log_decay is not None:  # the shifted stream lags by w steps of decay
            lag = torch.exp(log_decay.float() * w).repeat_interleave(self.num_heads // self.num_kv_heads)  # (H,)
            o_lin = o_lin * lag[None, None, :, None]
        return o_lin, state

    def evicted_readout(self, q, k, v):
        """What the linear part alone reads from the keys that have left the window, normalised by
        itself (no window, no mixing): q [B,T,H,D], k/v [B,T,Hk,D] (q and k as the feature maps read
        them, :meth:`feature_inputs`) -> y [B,T−w,H,D] fp32 for the
        queries t ≥ w (earlier ones have no evicted key). Sublayer 1 only; the training target of
        :func:`teacher_evicted_attention`."""
        B, T, H, D = q.shape
        w = self.window
        zeros = k.new_zeros(B, w, self.num_kv_heads, D)
        valid_all = torch.cat([torch.zeros(B, w, dtype=torch.bool, device=q.device), torch.ones(B, T, dtype=torch.bool, device=q.device)], 1)
        o, _ = self._evicted_scan(q, torch.cat([zeros, k], 1), torch.cat([zeros, v], 1), valid_all, None, False)
        return (o[..., :-1] / (o[..., -1:] + self.eps))[:, w:]

    def teacher_evicted_attention(self, q, k, v):
        """The teacher's softmax attention restricted to the keys older than the window, normalised
        over them: q [B,T,H,D], k/v [B,T,Hk,D] -> y [B,T−w,H,D] for the queries t ≥ w (the KV
        cache's readout that the linear part stands in for)."""
        w, T = self.window, q.shape[1]
        sliding = self.teacher_sliding_window
        # Query t (row t−w) sees keys s ≤ t−w, and s > t − sliding if the teacher slides.
        mask = teacher_mask(T - w, None, sliding - w if sliding else None, q.device)
        return softmax_attention(q[:, w:], k[:, : T - w], v[:, : T - w], mask, self.scaling, self.softcap)

    def _hybrid(self, q, k, v, valid, layer_cache, state, recurrent, qf, kf):
        """The hybrid without a sparse cache; qf/kf: what the feature maps read (:meth:`feature_inputs`).
        The cache's ``recent`` holds the window's keys, values and flags, and its keys as the
        feature maps read them when those differ."""
        B, T, H, D = q.shape
        w = self.window
        if layer_cache is not None and layer_cache.recent is not None:
            wk, wv, wvalid, *wkf = layer_cache.recent
        else:
            wk, wv = k.new_zeros(B, w, self.num_kv_heads, D), v.new_zeros(B, w, self.num_kv_heads, D)
            wvalid = torch.zeros(B, w, dtype=torch.bool, device=q.device)
            wkf = [torch.zeros_like(wk)] if self.unrotates else []
        cur_valid = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=q.device)
        k_all, v_all = torch.cat([wk, k], 1), torch.cat([wv, v], 1)  # (B, w+T, Hk, D)
        kf_all = torch.cat([wkf[0], kf], 1) if self.unrotates else k_all
        valid_all = torch.cat([wvalid, cur_valid], 1)  # (B, w+T)
        o_lin, state = self._evicted_scan(qf, kf_all, v_all, valid_all, state, recurrent)
        num, den, m = window_softmax(q, k_all, v_all, valid_all, w, self.scaling, self.softcap)
        y = mix_exact_linear(num, den, m, o_lin[..., :-1], o_lin[..., -1], self.log_mix, self.eps)
        recent = (k_all[:, -w:], v_all[:, -w:], valid_all[:, -w:]) + ((kf_all[:, -w:],) if self.unrotates else ())
        return y, state, recent

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask=None,
        cache=None,
        distill_mode: str | None = None,
        distill_padding_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """hidden [B,T,hidden] -> (out [B,T,hidden], None). ``distill_padding_mask`` is the 2D
        attention mask [B, ≥T] (1 = token); its last T columns cover these tokens."""
        mode = distill_mode or "auto"
        if mode not in MODES:
            raise ValueError(f"distill_mode must be one of {', '.join(MODES)}, got {mode!r}")
        B, T, _ = hidden_states.shape
        valid = None
        if distill_padding_mask is not None:
            valid = distill_padding_mask[:, -T:].bool()
            valid = None if bool(valid.all()) else valid
        q, k, v = self.project(hidden_states, position_embeddings)
        if mode == "teacher":
            if cache is not None:
                raise ValueError("teacher mode runs without a cache; call the model with use_cache=False")
            y = self.teacher_attention(q, k, v, valid)
        else:
            layer_cache = None
            if cache is not None:
                layer_cache = cache.layers[self.layer_idx]
                if not isinstance(layer_cache, RecurrentLayer):
                    raise ValueError(
                        f"layer {self.layer_idx} needs a distill RecurrentCache, got {type(cache).__name__}; "
                        "let the model create its cache (do not pass a DynamicCache)"
                    )
            recurrent = mode == "recurrent" or (mode == "auto" and T == 1)
            y = self.student_attention(q, k, v, valid, layer_cache, recurrent, position_embeddings)
        out = self.o_proj(y.to(hidden_states.dtype).reshape(B, T, self.num_heads * self.head_dim))
        return out, None
