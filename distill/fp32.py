"""Tensors that stay float32 when a model is cast (``model.to(torch.bfloat16)``).

Decays, polynomial coefficients and mixing factors are few numbers whose exact value matters:
rounded to bf16 (3 significant digits), a decay of 1 − 1/512 becomes 1 and a positive
polynomial's constant term can fall below the bound that keeps it positive.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class KeepFloat32(nn.Module):
    """Mixin: the parameters and buffers named in ``float32_tensors`` keep float32 through
    ``.to()``, ``.half()``, ``.bfloat16()`` (device moves still apply)."""

    float32_tensors: ClassVar[tuple[str, ...]] = ()

    def _apply(self, fn, recurse=True):
        before = {n: t.data for n in self.float32_tensors if (t := getattr(self, n, None)) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            tensor = getattr(self, name)
            if tensor.dtype != torch.float32 and tensor.is_floating_point():
                tensor.data = old.to(device=tensor.device, dtype=torch.float32)
        return self
