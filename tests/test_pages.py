"""Weights and KV caches in 2 MiB pages (chat.lean.pages): values, sharing and places kept, and a loaded
artifact's weights really in such pages where Linux gives them."""

from __future__ import annotations

import gc
import mmap
from pathlib import Path

import pytest
import torch
from torch import nn

from chat.backends.torchscript_backend import TorchScriptBackend
from chat.lean.cache import grow_cache
from chat.lean.pages import ALIGN, huge_page_zeros, move_to_huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_given() -> bool:
    """Whether Linux gives 2 MiB pages to memory that asks for them ("[never]" is off)."""
    return hasattr(mmap, "MADV_HUGEPAGE") and THP.is_file() and "[never]" not in THP.read_text()


def huge_kib_at(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds `address`, in KiB."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and ":" not in first:
            start, end = (int(part, 16) for part in first.split("-"))
            inside = start <= address < end
        elif inside and first == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        shared = torch.randn(300, 7).bfloat16()
        self.register_buffer("first", shared)
        self.register_buffer("again", shared)  # one tensor under two names, as tied weights are
        self.register_buffer("rows", torch.randint(-127, 128, (33, 65), dtype=torch.int8))
        self.register_buffer("packed", torch.randint(0, 256, (9, 32), dtype=torch.uint8))
        self.register_buffer("steps", torch.rand(9, 2, 2).half())
        self.register_buffer("eps", torch.tensor(1e-6))  # a 0-dimensional tensor
        self.register_buffer("empty", torch.zeros(0))
        self.weight = nn.Parameter(torch.randn(5, 3), requires_grad=False)


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no madvise(MADV_HUGEPAGE) here")
def test_moved_tensors_keep_their_values_and_sharing_in_one_block_at_cache_lines():
    holder = Holder()
    before = {name: t.clone() for name, t in [*holder.named_buffers(), *holder.named_parameters()]}
    moved = move_to_huge_pages(holder)
    after = dict([*holder.named_buffers(), *holder.named_parameters()])
    for name, value in before.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name
    assert holder.first.data_ptr() == holder.again.data_ptr()
    places = sorted(t.data_ptr() for name, t in after.items() if t.numel() and name != "again")
    assert all(p % ALIGN == 0 for p in places) and places[-1] - places[0] < moved
    assert len({t.untyped_storage().data_ptr() for t in after.values() if t.numel()}) == 1  # one block


def test_without_room_for_a_mapping_the_tensors_stay_where_they_are(monkeypatch):
    def no_room(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    holder = Holder()
    before = {name: (t.data_ptr(), t.clone()) for name, t in holder.named_buffers()}
    monkeypatch.setattr(mmap, "mmap", no_room)
    assert move_to_huge_pages(holder) == 0
    for name, t in holder.named_buffers():
        assert t.data_ptr() == before[name][0] and torch.equal(t, before[name][1])
    [zeros] = huge_page_zeros([(2, 3)], torch.float32)
    assert torch.equal(zeros, torch.zeros(2, 3))


def test_huge_page_zeros_are_zeros_of_their_shapes():
    k, v = huge_page_zeros([(1, 3, 16, 8), (1, 3, 16, 8)], torch.bfloat16)
    assert k.shape == v.shape == (1, 3, 16, 8) and k.dtype == torch.bfloat16
    assert not k.any() and not v.any()
    k.fill_(1)
    assert not v.any()  # neighbours, not the same memory


def huge_kib() -> int:
    return int(
        next(line for line in Path("/proc/self/smaps_rollup").read_text().splitlines() if "AnonHuge" in line).split()[1]
    )


@pytest.mark.skipif(not huge_pages_given(), reason="Linux gives no 2 MiB pages here")
def test_a_loaded_artifact_decodes_from_huge_pages_and_its_cache_grows_in_them(llama_artifact):
    gc.collect()  # blocks of earlier tests go first
    before = huge_kib()
    backend = TorchScriptBackend(llama_artifact)
    try:
        logits = backend.prefill([5, 6, 7])  # pages are given as they are first written
        assert huge_kib() - before >= 2 * 2048  # the weights' block, and the cache's
        attention = getattr(backend.module.blocks, "0").attention
        assert huge_kib_at(attention.k_cache.data_ptr()) >= 2048
        grow_cache(backend.module, 2 * attention.k_cache.size(2), keep=3)
        assert huge_kib_at(attention.k_cache.data_ptr()) >= 2048
        assert torch.equal(backend.decode(int(logits.argmax())), backend_again(llama_artifact, logits))
    finally:
        backend.close()


def backend_again(artifact: Path, logits: torch.Tensor) -> torch.Tensor:
    """The same decode step on a fresh load whose cache never grew."""
    other = TorchScriptBackend(artifact)
    try:
        assert torch.equal(other.prefill([5, 6, 7]), logits)
        return other.decode(int(logits.argmax()))
    finally:
        other.close()
