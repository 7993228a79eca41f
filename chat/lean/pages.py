"""A loaded module's tensors moved into one block of memory backed by 2 MiB pages, on Linux CPUs.

Decode streams every weight once a token. In 4 KiB pages that stream misses the TLB every page, and in a
virtual machine each miss walks two page tables: one core then reads weights at about half the speed it
does from 2 MiB pages. Linux gives a process 2 MiB pages ("transparent huge pages") for memory it asks them
for (madvise), also where they are not the default; torch asks only for single allocations of 2 MiB and more,
which most weight matrices of a small model are not. So the weights (and the KV cache) go into one private
anonymous mapping, in the order the module holds them (the order decode reads them), each tensor keeping
its place in the module.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
from collections.abc import Callable, Sequence

import torch
from torch import nn

HUGE_PAGE = 2 << 20
ALIGN = 64  # a cache line: the kernels' vector loads never straddle two
TRIM_EVERY = 32 << 20  # bytes moved between handing freed memory back, which bounds the peak while moving


def _aligned(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _block(size: int) -> torch.Tensor | None:
    """`size` bytes of zeroed memory advised to use 2 MiB pages, as a uint8 tensor that keeps the mapping alive
    as long as a view of it does; None where this system has no such advice or no room for the mapping."""
    if not hasattr(mmap, "MADV_HUGEPAGE") or size == 0:
        return None
    # Private: shared anonymous memory is file-backed (shmem), whose 2 MiB pages are off by default. A size of
    # whole 2 MiB pages: Linux aligns the start of such a mapping to one.
    try:
        block = mmap.mmap(-1, _aligned(size, HUGE_PAGE), flags=mmap.MAP_PRIVATE)
    except OSError:  # no room for a mapping: the tensors stay where they are
        return None
    with contextlib.suppress(OSError):  # a kernel built without huge pages: plain pages, still one stream
        block.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(block, dtype=torch.uint8)


def _layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Where each of `sizes` bytes goes in one block, each at a cache line; and the block's size."""
    places, end = [], 0
    for size in sizes:
        places.append(end)
        end = _aligned(end + size, ALIGN)
    return places, end


def _view(block: torch.Tensor, place: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    return block[place : place + _count(shape) * dtype.itemsize].view(dtype).view(tuple(shape))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    return getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's, found in the process; other C libraries lack it


def give_back_freed_memory() -> None:
    """Hand the C heap's free pages back to the system. glibc keeps what a load freed (torch.jit.load's copies
    of the weights, the tokenizer's parse, freezing's passes) for later allocations that a chat never makes."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def move_to_huge_pages(module: nn.Module) -> int:
    """Move the CPU buffers and parameters of `module` (before freezing) into one block of 2 MiB pages; return
    the bytes moved (0 where this system has none to give). Tensors shared between names move once; each keeps
    its dtype, shape and values, and the memory each leaves goes back to the system as the move goes."""
    tensors: dict[int, torch.Tensor] = {}
    for tensor in [*module.buffers(), *module.parameters()]:
        if tensor.device.type == "cpu" and tensor.numel() > 0 and tensor.is_contiguous():
            tensors.setdefault(tensor.untyped_storage().data_ptr(), tensor)
    places, size = _layout([t.numel() * t.element_size() for t in tensors.values()])
    block = _block(size)
    if block is None:
        return 0
    moved_since_trim = 0
    with torch.no_grad():
        for place, tensor in zip(places, tensors.values(), strict=True):
            moved = _view(block, place, tensor.dtype, tensor.shape)
            moved.copy_(tensor)
            tensor.set_(moved)  # the old storage is freed here: its tensor was the last to hold it
            moved_since_trim += moved.nbytes
            if moved_since_trim >= TRIM_EVERY:
                give_back_freed_memory()
                moved_since_trim = 0
    give_back_freed_memory()
    return size


def huge_page_zeros(shapes: Sequence[Sequence[int]], dtype: torch.dtype) -> list[torch.Tensor]:
    """Zeroed CPU tensors of these shapes in one block of 2 MiB pages (plain torch.zeros where there are none)."""
    places, size = _layout([dtype.itemsize * _count(shape) for shape in shapes])
    block = _block(size)
    if block is None:
        return [torch.zeros(*shape, dtype=dtype) for shape in shapes]
    return [_view(block, place, dtype, shape) for place, shape in zip(places, shapes, strict=True)]


def _count(shape: Sequence[int]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count
