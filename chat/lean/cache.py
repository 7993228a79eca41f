"""The KV cache of a lean module, eager or loaded TorchScript: given at load, grown as a conversation grows.

An artifact holds its model's own context; a chat allocates a chunk of it and grows it by chunks, so that a
short chat does not pay for every position. Artifacts are saved with empty caches: the file holds weights.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from chat.lean.shape import Shape


def _attention_layers(module: nn.Module) -> Iterator[nn.Module]:
    # By name: a frozen TorchScript module cannot list its children, but still has them.
    layer = 0
    while hasattr(module.blocks, str(layer)):
        yield getattr(module.blocks, str(layer)).attention
        layer += 1


def allocate_cache(module: nn.Module, shape: Shape, length: int, dtype: torch.dtype, device: torch.device) -> None:
    """Give every layer a zeroed cache of `length` positions (0: none, to save the module)."""
    for layer in _attention_layers(module):
        layer.k_cache = torch.zeros(1, shape.kv_heads, length, shape.head_dim, dtype=dtype, device=device)
        layer.v_cache = torch.zeros(1, shape.kv_heads, length, shape.head_dim, dtype=dtype, device=device)


def grow_cache(module: nn.Module, length: int, keep: int) -> None:
    """Make every layer's cache `length` positions long, keeping its first `keep` positions' keys and values."""
    for layer in _attention_layers(module):
        for name in ("k_cache", "v_cache"):
            old = getattr(layer, name)
            new = old.new_zeros(old.size(0), old.size(1), length, old.size(3))
            new[:, :, :keep] = old[:, :, :keep]
            setattr(layer, name, new)
