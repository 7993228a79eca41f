"""What the lean module knows of its model: sizes and the family's traits as data, stored in the manifest.

Standard library only: reading a manifest needs no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# rms: scaled in the model's dtype (llama); rms_float: scaled in float32, then cast (OLMo 2); rms_offset: as
# rms_float with the weight standing for 1 + w (Gemma).
NORMS = ("rms", "rms_float", "rms_offset", "layer")
PLACEMENTS = ("pre", "sandwich", "post")  # norms before each half, before and after it (Gemma), after it (OLMo 2)
ACTIVATIONS = ("silu", "gelu_tanh")
MLPS = ("gated", "plain")  # gated: act(gate) * up (one [gate; up] matmul); plain: act(up), GPT-2's
QK_NORMS = ("", "head", "width")  # RMSNorm of q and k before RoPE: per head (Qwen3, Gemma 3) or over the width (OLMo 2)


@dataclass
class Shape:
    family: str  # the family of module (chat.artifact.FAMILIES), for messages
    vocab_size: int
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    norm: str
    norm_eps: float
    activation: str
    rotary_dim: int  # 0: learned absolute positions instead of RoPE (GPT-2)
    mlp: str = "gated"
    norm_placement: str = "pre"
    qk_norm: str = ""
    attn_scale: float = 0.0  # the factor of q.k; 0: 1 / sqrt(head_dim)
    attn_softcap: float = 0.0  # scores become c * tanh(scores / c) (Gemma 2); 0: none
    final_softcap: float = 0.0  # the same on the logits
    embed_scale: float = 1.0  # embeddings times this (Granite's embedding_multiplier; Gemma's sqrt(hidden))
    embed_scale_in_dtype: bool = False  # the scale rounded to the model's dtype first (Gemma's normalizer)
    residual_scale: float = 1.0  # each half's output times this before the residual add (Granite)
    logits_divisor: float = 1.0  # logits divided by this (Granite's logits_scaling)
    # Per layer: 0 for attention over every earlier position, W for the last W positions only (sliding window).
    windows: list[int] = field(default_factory=list)
    # Per layer: which of the module's RoPE tables it uses (Gemma 3: one per layer type), -1 for none (SmolLM3).
    rope_tables: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.windows = list(self.windows) or [0] * self.layers
        self.rope_tables = list(self.rope_tables) or [0 if self.rotary_dim else -1] * self.layers


FIELDS = frozenset(f.name for f in dataclasses.fields(Shape))
