"""The KV cache of a lean module, eager or loaded TorchScript: given at load, grown as a conversation grows.

An artifact holds its model's own context; a chat allocates a chunk of it and grows it by chunks, so that a
short chat does not pay for every position. Artifacts are saved with empty caches: the file holds weights.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from chat.lean.pages import huge_page_zeros
from chat.lean.shape import Shape


def _attention_layers(module: nn.Module) -> Iterator[nn.Module]:
    # By name: a frozen TorchScript module cannot list its children, but still has them.
    layer = 0
    while hasattr(module.blocks, str(layer)):
        yield getattr(module.blocks, str(layer)).attention
        layer += 1


def _zeros(shape: tuple[int, ...], count: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    # On the CPU in 2 MiB pages, as the weights: attention reads the whole filled cache every token.
    if device.type == "cpu":
        return huge_page_zeros([shape] * count, dtype)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(count)]


def allocate_cache(module: nn.Module, shape: Shape, length: int, dtype: torch.dtype, device: torch.device) -> None:
    """Give every layer a zeroed cache of `length` positions (0: none, to save the module)."""
    layers = list(_attention_layers(module))
    caches = iter(_zeros((1, shape.kv_heads, length, shape.head_dim), 2 * len(layers), dtype, device))
    for layer in layers:
        layer.k_cache, layer.v_cache = next(caches), next(caches)


def grow_cache(module: nn.Module, length: int, keep: int) -> None:
    """Make every layer's cache `length` positions long, keeping its first `keep` positions' keys and values."""
    layers = list(_attention_layers(module))
    old = layers[0].k_cache
    caches = iter(_zeros((old.size(0), old.size(1), length, old.size(3)), 2 * len(layers), old.dtype, old.device))
    for layer in layers:
        for name in ("k_cache", "v_cache"):
            new = next(caches)
            new[:, :, :keep] = getattr(layer, name)[:, :, :keep]
            setattr(layer, name, new)
