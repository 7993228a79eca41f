"""Weights rounded for export --quantize: int8 rows, or int4 groups.

Decode on the CPU is a stream of weights through matrix-vector products, so fewer bytes are more tokens a
second. Activations, norms, untied embeddings and the KV cache keep the export's dtype; only the matmul
weights become int8 or int4. A tied embedding is looked up in the int8 head's rows.

int8: each row to 255 levels of its own float32 scale (symmetric: row = q * scale, q in [-127, 127], scale =
max |row| / 127); the output head too.

int4: each group of 32 weights along a row to 16 levels, w = d * q + m with q in [0, 15], d and m float16
(Q4_1's layout in llama.cpp's terms: 5 bits a weight). Of a few ranges a little inside the group's min and max,
the one with the least squared error is kept. The output head, which decides every token, stays int8, as do
matrices whose rows are not a multiple of 64 weights (the kernels' run). Packing: chat/native/int4.h.

--verify checks the artifact against transformers running the same rounded weights (round_model_weights),
so it tests the export, not the rounding; what rounding costs a model is a question of its own
(tools/quantize_quality.py).
"""

from __future__ import annotations

import torch
from torch import nn

from chat.lean.model import MATMUL_WEIGHTS, Weights
from chat.lean.ops import INT4_GROUP, INT4_RUN, quantized_weights

# Fractions of a group's range cut from its low and its high end, tried for each group.
INT4_TRIMS = (0.0, 0.02, 0.04, 0.07, 0.1)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): int8 rows and their float32 scales, w ~ q * scale[:, None]. An all-zero row gets scale 1."""
    w = w.float()
    top = w.abs().amax(dim=1)
    scale = torch.where(top > 0, top / 127, torch.ones_like(top))
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed, scales): int4 rows (uint8, two a byte) and their groups' steps and offsets (float16,
    (rows, 2, groups)), w ~ int4_weights(packed, scales). Rows must hold a multiple of 64 weights."""
    rows, width = w.shape
    groups = w.float().reshape(rows, width // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    best: tuple[torch.Tensor, ...] | None = None  # error, levels, steps, offsets
    for offsets, steps in _int4_ranges(low, high):
        levels = torch.round((groups - offsets.float().unsqueeze(2)) / steps.float().unsqueeze(2)).clamp(0, 15)
        made = levels * steps.float().unsqueeze(2) + offsets.float().unsqueeze(2)  # as int4_weights computes it
        error = (made - groups).square().sum(dim=2)
        if best is None:
            best = error, levels, steps, offsets
            continue
        better = error < best[0]
        best = (
            torch.where(better, error, best[0]),
            torch.where(better.unsqueeze(2), levels, best[1]),
            torch.where(better, steps, best[2]),
            torch.where(better, offsets, best[3]),
        )
    _, levels, steps, offsets = best
    runs = levels.to(torch.uint8).reshape(rows, width // INT4_RUN, 2, 32)
    packed = (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(rows, width // 2)
    return packed, torch.stack([steps, offsets], dim=1)


def _int4_ranges(low: torch.Tensor, high: torch.Tensor):
    """(offsets, steps) in float16 to try per group: the range [low, high] trimmed at either end. The untrimmed
    step's float16 neighbours are tried too, so that weights already rounded this way come back exactly (one of
    them is their own step): rounding twice changes nothing."""
    span = high - low
    for cut_low in INT4_TRIMS:
        for cut_high in INT4_TRIMS:
            offsets = (low + cut_low * span).half()
            steps = ((high - cut_high * span - offsets.float()) / 15).half()
            steps = torch.where(steps.float() > 0, steps, torch.ones_like(steps))  # a constant group: q = 0
            yield offsets, steps
            if cut_low == cut_high == 0:
                bits = steps.view(torch.int16)
                yield offsets, (bits + 1).view(torch.float16)
                yield offsets, torch.where(bits > 1, bits - 1, bits).view(torch.float16)


def quantize(kind: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, scales) of a matmul weight (out, in) as export stores it: int4 groups where kind is int4 and its
    rows hold a multiple of 64 weights, else int8 rows."""
    return quantize_groups(w) if kind == "int4" and w.size(1) % INT4_RUN == 0 else quantize_rows(w)


def round_to(kind: str, w: torch.Tensor) -> torch.Tensor:
    """w (out, in) with each row replaced by what its quantized form stands for (float32)."""
    return quantized_weights(*quantize(kind, w))


@torch.no_grad()
def round_model_weights(model: nn.Module, kind: str) -> None:
    """Round, in place, the weights of every matmul of a transformers causal LM (float32) as export rounds them:
    nn.Linear rows, and the columns of GPT-2's Conv1D, whose weight is stored (in, out); the output head to int8
    whatever the kind. A tied input embedding is rounded with the head it shares its weight with; export keeps
    it in the same rounded values. Rounding twice changes nothing, so the artifact made from the rounded model
    holds the same quantized weights."""
    head = model.get_output_embeddings()
    for module in model.modules():
        layer_kind = "int8" if module is head else kind
        if isinstance(module, nn.Linear):
            module.weight.copy_(round_to(layer_kind, module.weight))
        elif type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: y = x @ W + b
            module.weight.copy_(round_to(layer_kind, module.weight.t()).t())


def quantize_weights(top: Weights, layers: list[Weights], kind: str) -> tuple[Weights, list[Weights]]:
    """The converted weights with each matmul weight quantized and its scales beside it (name + "_scale"). The
    head is int8. A tied embedding is then kept once, as the head's rows (its "embed" becomes None): the model
    looks a token's row up there, made whole to the values the embedding held (rounded with the head)."""
    top = dict(top)
    tied = top["lm_head"] is None
    head = top["embed"] if tied else top["lm_head"]
    top["lm_head"], top["lm_head_scale"] = quantize_rows(head)
    if tied:
        top["embed"] = None
    quantized = []
    for weights in layers:
        weights = dict(weights)
        for name in MATMUL_WEIGHTS:
            weights[name], weights[name + "_scale"] = quantize(kind, weights[name])
        quantized.append(weights)
    return top, quantized
