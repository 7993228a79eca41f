"""Weights rounded to int8 for export --quantize int8: each matmul weight row to 255 levels of its own scale.

Decode on the CPU is a stream of weights through matrix-vector products, so half the bytes of bfloat16 is
close to twice the tokens a second. Activations, norms, embeddings and the KV cache keep the export's dtype;
only the matmul weights (the output head included) become int8, with one float32 scale per output row
(symmetric: row = q * scale, q in [-127, 127], scale = max |row| / 127).

--verify checks the artifact against transformers running the same rounded weights (round_model_weights),
so it tests the export, not the rounding; what rounding costs a model is a question of its own.
"""

from __future__ import annotations

import torch
from torch import nn

from chat.lean.model import MATMUL_WEIGHTS, Weights


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): int8 rows and their float32 scales, w ~ q * scale[:, None]. An all-zero row gets scale 1."""
    w = w.float()
    top = w.abs().amax(dim=1)
    scale = torch.where(top > 0, top / 127, torch.ones_like(top))
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def round_to_int8(w: torch.Tensor) -> torch.Tensor:
    """w with each row replaced by what its int8 form stands for (float32)."""
    q, scale = quantize_rows(w)
    return q.float() * scale[:, None]


@torch.no_grad()
def round_model_weights(model: nn.Module) -> None:
    """Round, in place, the weights of every matmul of a transformers causal LM (float32) as export rounds them:
    nn.Linear rows, and the columns of GPT-2's Conv1D, whose weight is stored (in, out). A tied input
    embedding is rounded with the head it shares its weight with; export keeps it in the same rounded values.
    Rounding twice changes nothing, so the artifact made from the rounded model holds the same int8 weights."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.copy_(round_to_int8(module.weight))
        elif type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: y = x @ W + b
            module.weight.copy_(round_to_int8(module.weight.t()).t())


def quantize_weights(top: Weights, layers: list[Weights]) -> tuple[Weights, list[Weights]]:
    """The converted weights with each matmul weight as int8 and its scales beside it (name + "_scale"). A tied
    head becomes an int8 copy of the embedding, which stays as it was for the token lookups."""
    top = dict(top)
    head = top["lm_head"] if top["lm_head"] is not None else top["embed"]
    top["lm_head"], top["lm_head_scale"] = quantize_rows(head)
    quantized = []
    for weights in layers:
        weights = dict(weights)
        for name in MATMUL_WEIGHTS:
            weights[name], weights[name + "_scale"] = quantize_rows(weights[name])
        quantized.append(weights)
    return top, quantized
