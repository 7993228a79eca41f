"""From a transformers model to the lean module's shape and weights: each family's traits as data.

A llama-like family is a row of TRAITS (its norm kind and placement, activation, q/k norms, embedding scale);
the numbers a config carries (soft-caps, multipliers, windows per layer, RoPE per layer) are read from it by
the names transformers gives them, the same across families.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chat.artifact import FAMILIES
from chat.errors import ChatError
from chat.lean.model import RopeTable, Weights
from chat.lean.shape import Shape

# model_types whose state is recurrent or whose layers are not all attention: the lean module has no form for them.
RECURRENT = (
    "qwen3_next",
    "qwen3_5",
    "qwen3_5_text",
    "gemma3n",
    "gemma3n_text",
    "lfm2",
    "granitemoehybrid",
    "mamba",
    "falcon_h1",
    "jamba",
    "zamba2",
    "bamba",
    "recurrent_gemma",
    "gemma4",
    "gemma4_text",
)


@dataclass(frozen=True)
class Traits:
    norm: str = "rms"
    placement: str = "pre"  # see chat.lean.shape.PLACEMENTS
    activation: str = "silu"
    qk_norm: str = ""
    embed_root: bool = False  # embeddings times sqrt(hidden), rounded to the model's dtype first (Gemma)
    capped_attention: bool = False  # attn_logit_softcapping applies (Gemma 2; Gemma 3's config has it, unused)
    fused: bool = False  # q/k/v and gate/up already one matmul each (Phi-3)


TRAITS = {
    "llama": Traits(),
    "phi3": Traits(fused=True),
    "qwen3": Traits(qk_norm="head"),
    "gemma2": Traits(
        norm="rms_offset", placement="sandwich", activation="gelu_tanh", embed_root=True, capped_attention=True
    ),
    "gemma3": Traits(norm="rms_offset", placement="sandwich", activation="gelu_tanh", qk_norm="head", embed_root=True),
    "granite": Traits(),
    "olmo2": Traits(norm="rms_float", placement="post", qk_norm="width"),
    "smollm3": Traits(),
}
# The state_dict names of a layer's norms by placement: before attention, after it, before the MLP, after it.
NORM_NAMES = {
    "pre": ("input_layernorm", None, "post_attention_layernorm", None),
    "sandwich": (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ),
    "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),
}
# RoPE whose table depends on the length of the sequence transformers runs: the lean table is exact below it.
LENGTH_DEPENDENT_ROPE = ("longrope", "dynamic")


def family_of(model_type: str) -> str:
    if model_type in RECURRENT:
        raise ChatError(
            f"'{model_type}' models keep recurrent state or mixed layers, which chat's TorchScript core does not "
            "run; use --backend transformers"
        )
    if model_type not in FAMILIES:
        raise ChatError(
            f"exporting '{model_type}' models to TorchScript is not supported yet "
            f"(supported: {', '.join(sorted(FAMILIES))}); use --backend transformers"
        )
    return FAMILIES[model_type]


def context_limit(config, max_len: int | None) -> int:
    """max_len, or the model's own context. RoPE that changes with the sequence's length (Phi-3.5's longrope,
    dynamic NTK) is exact only up to original_max_position_embeddings, where the lean table stops."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    rope = _rope_parameters(config)
    rope_type = rope.get("rope_type")
    original = getattr(config, "original_max_position_embeddings", None) or rope.get("original_max_position_embeddings")
    reason = ""
    if rope_type in LENGTH_DEPENDENT_ROPE and original and original < limit:
        limit, reason = original, f" with its {rope_type} RoPE, whose factors change past {original} tokens"
    if max_len is None:
        return limit
    if max_len > limit:
        raise ChatError(
            f"--max-len={max_len} is beyond what this model supports in TorchScript ({limit}{reason}); "
            f"use at most {limit}, or --backend transformers"
        )
    return max_len


def convert(model, max_len: int) -> tuple[Shape, Weights, list[Weights], list[RopeTable]]:
    """Shape, top-level weights, per-layer weights and the RoPE tables (cos, signed sin) of a float32 model."""
    config = model.config
    family = family_of(config.model_type)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if family == "gpt2":
        return _gpt2(config, state)
    traits = TRAITS[family]
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    wanted = {"silu": ("silu",), "gelu_tanh": ("gelu_pytorch_tanh", "gelu_new")}[traits.activation]
    if activation not in wanted:
        raise ChatError(f"exporting a {config.model_type} model with activation {activation} is not supported yet")
    heads = config.num_attention_heads
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    ropes, rope_of_layer = _rope_tables(model, max_len)
    layer_types = getattr(config, "layer_types", None)
    sliding = getattr(config, "sliding_window", None) or 0
    windows = [sliding if t == "sliding_attention" else 0 for t in layer_types] if layer_types else None
    if windows is None and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        windows = [config.sliding_window] * config.num_hidden_layers  # Mistral: every layer
    # A window as long as the context is no window.
    windows = [w if w < max_len else 0 for w in windows] if windows else []
    no_rope = getattr(config, "no_rope_layers", None)  # SmolLM3: 1 where a layer uses RoPE
    if no_rope is not None:
        rope_of_layer = [table if uses else -1 for table, uses in zip(rope_of_layer, no_rope, strict=True)]
    scale = getattr(config, "attention_multiplier", None)
    if getattr(config, "query_pre_attn_scalar", None):
        scale = config.query_pre_attn_scalar**-0.5
    shape = Shape(
        family=family,
        vocab_size=config.vocab_size,
        hidden_size=hidden,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        norm=traits.norm,
        norm_eps=config.rms_norm_eps,
        activation=traits.activation,
        rotary_dim=ropes[0][0].shape[-1],
        norm_placement=traits.placement,
        qk_norm=traits.qk_norm,
        attn_scale=float(scale or 0.0),
        attn_softcap=float((traits.capped_attention and getattr(config, "attn_logit_softcapping", None)) or 0.0),
        final_softcap=float(getattr(config, "final_logit_softcapping", None) or 0.0),
        embed_scale=hidden**0.5 if traits.embed_root else float(getattr(config, "embedding_multiplier", 1.0)),
        embed_scale_in_dtype=traits.embed_root,
        residual_scale=float(getattr(config, "residual_multiplier", 1.0)),
        logits_divisor=float(getattr(config, "logits_scaling", 1.0)),
        windows=windows,
        rope_tables=rope_of_layer,
    )
    embed = state["model.embed_tokens.weight"]
    top = {
        "embed": embed,
        "pos_embed": None,
        "norm_w": state["model.norm.weight"],
        "norm_b": None,
        "lm_head": _untied_head(state, embed),
    }
    before_attn, after_attn, before_mlp, after_mlp = NORM_NAMES[traits.placement]
    layers = []
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        if traits.fused:  # qkv_proj, gate_up_proj (gate first)
            wqkv, bqkv = state[a + "qkv_proj.weight"], state.get(a + "qkv_proj.bias")
            wup, bup = state[m + "gate_up_proj.weight"], state.get(m + "gate_up_proj.bias")
        else:
            wqkv, bqkv = _cat(state, [a + "q_proj", a + "k_proj", a + "v_proj"])
            wup, bup = _cat(state, [m + "gate_proj", m + "up_proj"])
        layers.append(
            {
                "ln1": _weight(state, p, before_attn),
                "wqkv": wqkv,
                "bqkv": bqkv,
                "q_norm": state.get(a + "q_norm.weight") if traits.qk_norm else None,
                "k_norm": state.get(a + "k_norm.weight") if traits.qk_norm else None,
                "wo": state[a + "o_proj.weight"],
                "bo": state.get(a + "o_proj.bias"),
                "post_attn_norm": _weight(state, p, after_attn),
                "ln2": _weight(state, p, before_mlp),
                "wup": wup,
                "bup": bup,
                "wdown": state[m + "down_proj.weight"],
                "bdown": state.get(m + "down_proj.bias"),
                "post_mlp_norm": _weight(state, p, after_mlp),
            }
        )
    return shape, top, layers, ropes


def _weight(state: dict[str, torch.Tensor], prefix: str, name: str | None) -> torch.Tensor | None:
    return None if name is None else state[f"{prefix}{name}.weight"]


def _untied_head(state: dict[str, torch.Tensor], embed: torch.Tensor) -> torch.Tensor | None:
    """The output projection, or None when it is the embedding (tied): the file then holds it once."""
    head = state.get("lm_head.weight")
    return None if head is None or head.data_ptr() == embed.data_ptr() else head


def _cat(state: dict[str, torch.Tensor], names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([state[n + ".weight"] for n in names])
    biases = [state.get(n + ".bias") for n in names]
    if all(b is None for b in biases):
        return weight, None
    parts = [
        b if b is not None else weight.new_zeros(state[n + ".weight"].shape[0])
        for b, n in zip(biases, names, strict=True)
    ]
    return weight, torch.cat(parts)


def _rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params if isinstance(params, dict) else {}


def _rope_tables(model, max_len: int) -> tuple[list[RopeTable], list[int]]:
    """cos and sin for positions 0..max_len-1 from the model's own rotary module (so every RoPE scaling
    transformers knows is honoured), with the rotate-half sign folded into sin; one table per layer type
    where the module keeps one per type (Gemma 3), and each layer's table."""
    rotary = model.model.rotary_emb
    positions = torch.arange(max_len).unsqueeze(0)
    probe = torch.zeros(1, dtype=torch.float32)
    kinds = getattr(rotary, "layer_types", None)
    if kinds:
        tables = [_signed(*rotary(probe, positions, kind)) for kind in kinds]
        return tables, [kinds.index(kind) for kind in model.config.layer_types]
    return [_signed(*rotary(probe, positions))], [0] * model.config.num_hidden_layers


def _signed(cos: torch.Tensor, sin: torch.Tensor) -> RopeTable:
    cos, sin = cos[0].float(), sin[0].float()
    half = sin.shape[-1] // 2
    return cos, torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)


def _gpt2(config, state: dict[str, torch.Tensor]):
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn", False):
        raise ChatError("exporting GPT-2 variants with scaled or reordered attention is not supported yet")
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ChatError(f"exporting GPT-2 with activation {config.activation_function} is not supported yet")
    shape = Shape(
        family="gpt2",
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        layers=config.n_layer,
        heads=config.n_head,
        kv_heads=config.n_head,
        head_dim=config.n_embd // config.n_head,
        norm="layer",
        norm_eps=config.layer_norm_epsilon,
        activation="gelu_tanh",
        rotary_dim=0,
        mlp="plain",
    )
    embed = state["transformer.wte.weight"]
    top = {
        "embed": embed,
        "pos_embed": state["transformer.wpe.weight"],
        "norm_w": state["transformer.ln_f.weight"],
        "norm_b": state["transformer.ln_f.bias"],
        "lm_head": _untied_head(state, embed),
    }
    layers = []
    for i in range(shape.layers):
        p = f"transformer.h.{i}."
        # GPT-2's Conv1D stores weights as (in, out): transpose for F.linear.
        layers.append(
            {
                "ln1": state[p + "ln_1.weight"],
                "ln1_b": state[p + "ln_1.bias"],
                "wqkv": state[p + "attn.c_attn.weight"].t().contiguous(),
                "bqkv": state[p + "attn.c_attn.bias"],
                "wo": state[p + "attn.c_proj.weight"].t().contiguous(),
                "bo": state[p + "attn.c_proj.bias"],
                "ln2": state[p + "ln_2.weight"],
                "ln2_b": state[p + "ln_2.bias"],
                "wup": state[p + "mlp.c_fc.weight"].t().contiguous(),
                "bup": state[p + "mlp.c_fc.bias"],
                "wdown": state[p + "mlp.c_proj.weight"].t().contiguous(),
                "bdown": state[p + "mlp.c_proj.bias"],
            }
        )
    return shape, top, layers, []
