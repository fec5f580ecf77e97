"""A transformers ``Cache`` whose converted layers hold a constant-size recurrent state.

transformers' own ``LinearAttentionLayer`` keeps conv/recurrent tensors but no token count and no
pad-aware window, so converted layers use :class:`RecurrentLayer`; layers kept as softmax
attention use the stock ``DynamicLayer``.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer


class RecurrentLayer(CacheLayerMixin):
    """State of one converted attention layer.

    states: one fp32 tensor per stacked sublayer, [B, Hk, F, D+1] (S and z together).
    recent: the last w keys and values and their padding flags (keys [B, w, Hk, D], values
    [B, w, Hk, D], valid [B, w]), which the softmax window attends exactly (with a sparse cache,
    also their recall scores [B, w, Hk]).
    sparse: with ``sparse_cache: M``, the old keys kept exact per kv head (keys, values [B, M, Hk, D],
    scores, valid [B, M, Hk]); see :mod:`distill.sparse_cache`.
    With ``linear_rope: false``, recent and sparse end with their keys before RoPE (what the
    feature maps read) [B, w|M, Hk, D].
    """

    is_compileable = False
    is_croppable = False
    supports_early_init = False
    is_sliding = False

    def __init__(self) -> None:
        super().__init__()
        self.states: list[torch.Tensor] | None = None
        self.recent: tuple[torch.Tensor, ...] | None = None
        self.sparse: tuple[torch.Tensor, ...] | None = None
        self.seen = 0

    def lazy_initialization(self, *args, **kwargs) -> None:  # state is created by the first forward
        pass

    def update(self, *args, **kwargs):
        raise NotImplementedError("a converted layer keeps a recurrent state, not keys and values")

    def store(self, states: list[torch.Tensor], recent, num_tokens: int, sparse=None) -> None:
        self.states, self.recent, self.sparse = states, recent, sparse
        self.seen += num_tokens
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def offload(self):
        pass

    def prefetch(self):
        pass

    def reset(self) -> None:
        self.states, self.recent, self.sparse, self.seen, self.is_initialized = None, None, None, 0, False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a recurrent state cannot be rolled back; assisted decoding is not supported")

    def _map(self, fn) -> None:
        if self.states is not None:
            self.states = [fn(s) for s in self.states]
        if self.recent is not None:
            self.recent = tuple(fn(t) for t in self.recent)
        if self.sparse is not None:
            self.sparse = tuple(fn(t) for t in self.sparse)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    @property
    def batch_size(self) -> int:
        return self.states[0].shape[0] if self.states else -1

    def nbytes(self) -> int:
        tensors = list(self.states or []) + list(self.recent or []) + list(self.sparse or [])
        return sum(t.numel() * t.element_size() for t in tensors)


class RecurrentCache(Cache):
    """One layer cache per decoder layer: :class:`RecurrentLayer` for converted layers,
    ``DynamicLayer`` (a KV cache) for layers kept as softmax attention."""

    def __init__(self, converted: list[bool]):
        super().__init__(layers=[RecurrentLayer() if c else DynamicLayer() for c in converted])

    @property
    def batch_size(self) -> int:
        sizes = {layer.batch_size for layer in self.layers if isinstance(layer, RecurrentLayer)} - {-1}
        return sizes.pop() if sizes else -1

    def nbytes(self) -> int:
        """Bytes held: recurrent states, recent keys/values and any softmax layers' keys/values."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, RecurrentLayer):
                total += layer.nbytes()
            elif layer.is_initialized:
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        return total
