"""The TorchScript backend: runs an exported artifact (chat.export) with torch and tokenizers only.

No transformers on this path. The module keeps its KV cache inside; this class tracks which tokens the
cache holds, so a new prompt that extends the previous conversation only runs its new tokens, and grows the
cache as the conversation does (doubling, up to the artifact's context). On CUDA the decode step is replayed
through CUDA graphs, one per cache-length bucket, captured again when the cache grows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from chat import native
from chat.artifact import (
    MODEL_FILE,
    ArtifactError,
    check_sizes,
    device_problem,
    hash_check,
    read_manifest,
)
from chat.backends.base import BackendInfo, LoadOptions, common_prefix
from chat.errors import ChatError
from chat.lean.cache import allocate_cache, grow_cache
from chat.lean.ops import quiet_torchscript
from chat.lean.pages import give_back_freed_memory, move_to_huge_pages
from chat.lean.shape import Shape
from chat.threads import StartingThreads
from chat.tokenizer import FastTokenizer

# Prompt tokens per call: on 2 CPU cores a chunk of the demo model takes well under a second, so Ctrl+C
# (which Python handles between calls) lands quickly; each finished chunk is recorded as cached.
PREFILL_CHUNK = {"cpu": 512, "cuda": 1024}
SMALLEST_BUCKET = 128  # CUDA decode attends over a bucket of the cache: 128, 256, ... up to its length
FIRST_CACHE = 1024  # positions the cache starts with; it doubles when a conversation needs more


class TorchScriptBackend:
    def __init__(self, directory: str | Path, options: LoadOptions | None = None, *, cuda_graphs: bool = True):
        directory = Path(directory).expanduser()
        manifest = read_manifest(directory)
        check_sizes(directory, manifest)
        device = _device_for(directory, manifest, options)
        if options is not None and options.dtype not in ("auto", manifest["dtype"]):
            raise ArtifactError(
                f"{directory} holds {manifest['dtype']} weights, not {options.dtype}; "
                f"export one with --dtype={options.dtype}, or leave --dtype at auto"
            )
        hashes = hash_check(directory, manifest)
        threads = StartingThreads(options, device.type)
        torch.set_num_threads(threads.count)
        notes, kernels = [], ""
        if native.OPS in manifest.get("ops", []):
            # A missing library is built here (once, ~10 s of g++): this runs behind the prompt, before the
            # first reply, and torch's kernels behind the same ops are several times slower.
            if not native.load():
                notes.append(native.fallback_note())
            elif not (kernels := native.kernels_in_use()):
                notes.append("this CPU has neither AVX2 nor AVX-512: decoding on torch's own kernels, slower")
            if built := native.take_built_note():
                notes.append(built)
        try:
            with quiet_torchscript():
                module = torch.jit.load(str(directory / MODEL_FILE), map_location=device)
        except Exception as why:
            hashes.result()  # a changed file explains a failed load best
            first = (str(why).strip().splitlines() or [type(why).__name__])[0][:160]
            raise ArtifactError(
                f"{directory / MODEL_FILE} could not be loaded by torch {torch.__version__} ({first}); "
                f"it was exported with torch {manifest['torch_version']}: re-export it with this torch"
            ) from None
        hashes.result()
        self.shape = Shape(**manifest["shape"])
        self.max_len = int(manifest["max_len"])
        self.dtype = getattr(torch, manifest["dtype"])
        self.cache_positions = min(self.max_len, FIRST_CACHE)  # how many the KV cache has room for now
        if device.type == "cpu":
            move_to_huge_pages(module)  # before the cache is given: it gets pages of its own, and grows
        allocate_cache(module, self.shape, self.cache_positions, self.dtype, device)
        with quiet_torchscript():
            # Weights become constants: no attribute lookups per step (a few % of decode time on CPU).
            # The caches, which the methods write, stay attributes.
            module = torch.jit.freeze(module.eval(), preserved_attrs=["prefill", "decode"])
        self.module = module
        self.tokenizer = FastTokenizer(directory)
        self.tokenizer.eos_token_ids |= set(manifest["eos_token_ids"])
        give_back_freed_memory()
        self.manifest = manifest
        torch.set_num_threads(threads.settle())
        self.info = BackendInfo(
            name="torchscript",
            model=options.model if options else str(directory),
            path=str(directory),
            device=str(device),
            dtype=manifest["dtype"],
            context_length=self.max_len,
            threads=torch.get_num_threads(),
            threads_reason=threads.reason,
            kernels=kernels,
            quantization=manifest.get("quantization") or "",
            notes=notes,
        )
        self._device = device
        self._chunk = PREFILL_CHUNK[device.type]
        # TorchScript's optimizing executor pays only for the CUDA decode graphs (its fuser halves their time).
        # Elsewhere it costs seconds of profiling and compiling on first calls and on each new length (the
        # prompt's, the prefix's), which replies would wait for: every other call runs unoptimized.
        self._positions = torch.arange(self.max_len, device=device)
        self._cached: list[int] = []  # the token ids whose keys/values the cache holds, from position 0
        self._graphs: list[tuple[int, torch.cuda.CUDAGraph, torch.Tensor]] = []
        if device.type == "cuda" and cuda_graphs:
            self._capture_graphs()

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        ids = list(ids)
        if not ids:
            raise ChatError("nothing to run: the prompt is empty")
        if len(ids) > self.max_len:
            raise ChatError(
                f"the prompt has {len(ids)} tokens; this artifact holds {self.max_len}: "
                "shorten the conversation or export with a larger --max-len"
            )
        keep = common_prefix(self._cached, ids)
        if keep == len(ids):  # the whole prompt is cached: recompute the last token for its logits
            keep -= 1
        del self._cached[keep:]
        logits = None
        for start in range(keep, len(ids), self._chunk):
            chunk = ids[start : start + self._chunk]
            end = start + len(chunk)
            self._make_room(end)
            tokens = torch.tensor(chunk, device=self._device)
            with torch.jit.optimized_execution(False):
                logits = self.module.prefill(tokens, self._positions[start:end], self._positions[:end])
            # Only now is the chunk in the cache; an interrupt before this line leaves it unrecorded.
            self._cached.extend(chunk)
        return logits

    @torch.inference_mode()
    def decode(self, token: int) -> torch.Tensor:
        pos = len(self._cached)
        if pos >= self.max_len:
            raise ChatError(f"the context is full ({self.max_len} tokens); start a new conversation")
        self._make_room(pos + 1)
        if self._graphs:
            logits = self._replay(token, pos)
        else:
            tokens = torch.tensor([token], device=self._device)
            with torch.jit.optimized_execution(False):
                logits = self.module.decode(tokens, self._positions[pos : pos + 1], self._positions[: pos + 1])
        self._cached.append(token)
        return logits

    def close(self) -> None:
        self._graphs.clear()
        del self.module

    def _make_room(self, end: int) -> None:
        """Grow the cache, doubling, until positions up to `end` fit; its filled part is kept."""
        length = self.cache_positions
        if end <= length:
            return
        while length < end:
            length = min(self.max_len, length * 2)
        grow_cache(self.module, length, keep=len(self._cached))
        self.cache_positions = length
        if self._graphs:  # they replay on the old cache's memory
            self._graphs.clear()
            self._capture_graphs()

    def _capture_graphs(self) -> None:
        """One CUDA graph of the decode step per bucket of cache lengths up to the cache's, sharing static inputs
        and a pool."""
        self._token = torch.zeros(1, dtype=torch.long, device=self._device)
        # Warming up writes a slot: the next one to fill, which decode overwrites, never a cached token's.
        self._pos = torch.full((1,), len(self._cached), dtype=torch.long, device=self._device)
        length = self.cache_positions
        sizes, size = [], SMALLEST_BUCKET
        while size < length:
            sizes.append(size)
            size *= 2
        sizes.append(length)
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode(), torch.cuda.device(self._device):
            for size in sizes:
                window = self._positions[:size]
                stream = torch.cuda.Stream(self._device)
                stream.wait_stream(torch.cuda.current_stream(self._device))
                with torch.cuda.stream(stream):  # warm up: TorchScript profiles and fuses on the first runs
                    for _ in range(5):
                        self.module.decode(self._token, self._pos, window)
                torch.cuda.current_stream(self._device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self.module.decode(self._token, self._pos, window)
                self._graphs.append((size, graph, out))
        torch.cuda.synchronize(self._device)

    def _replay(self, token: int, pos: int) -> torch.Tensor:
        self._token.fill_(token)
        self._pos.fill_(pos)
        for size, graph, out in self._graphs:
            if pos < size:
                graph.replay()
                return out
        raise AssertionError("the last bucket is the cache's length, which decode made room for")


def _device_for(directory: Path, manifest: dict, options: LoadOptions | None) -> torch.device:
    problem = device_problem(manifest, torch.cuda.is_available())
    if problem:
        raise ArtifactError(f"{directory}: {problem}")
    wanted = options.device if options else "auto"
    if wanted == "auto":
        return torch.device(manifest["device"])
    device = torch.device(wanted)
    if device.type != manifest["device"]:
        raise ArtifactError(
            f"{directory} was exported for {manifest['device']}, not {device.type}; "
            f"export one with --device={device.type}"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ArtifactError(f"--device {wanted}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device
