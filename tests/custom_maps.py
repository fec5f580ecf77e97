"""A user-defined feature map, loaded in tests by its 'module:Class' path."""
import torch

from distill.feature_maps import FeatureMap


class SquarePlusOne(FeatureMap):
    """φ(x) = [x², 1]: positive, F = D + 1."""

    def __init__(self, head_dim, num_heads, num_kv_heads, gain: float = 1.0):
        super().__init__(head_dim, num_heads, num_kv_heads)
        self.feature_dim = head_dim + 1
        self.gain = gain

    def phi_q(self, q):
        return torch.cat([self.gain * q * q, torch.ones_like(q[..., :1])], dim=-1)

    phi_k = phi_q
