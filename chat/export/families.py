"""From a transformers model to the lean module's weights, one mapping per architecture family."""

from __future__ import annotations

import torch

from chat.artifact import FAMILIES
from chat.errors import ChatError
from chat.export.model import Shape

Weights = dict[str, torch.Tensor | None]


def family_of(model_type: str) -> str:
    if model_type not in FAMILIES:
        raise ChatError(
            f"exporting '{model_type}' models to TorchScript is not supported yet "
            f"(supported: {', '.join(sorted(FAMILIES))}); use --backend transformers"
        )
    return FAMILIES[model_type]


def context_limit(config, max_len: int | None) -> int:
    """max_len, or the model's own limit (capped at 4096 to keep the cache small); never beyond a sliding window,
    which the lean module does not implement."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        limit = min(limit, window)
    if max_len is None:
        return min(limit, 4096)
    if max_len > limit:
        raise ChatError(f"--max-len={max_len} is beyond what this model supports ({limit}); use at most {limit}")
    return max_len


def convert(model, max_len: int) -> tuple[Shape, Weights, list[Weights], tuple[torch.Tensor, torch.Tensor] | None]:
    """Shape, top-level weights, per-layer weights and the RoPE table (cos, signed sin) of a float32 model."""
    config = model.config
    family = family_of(config.model_type)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if family == "gpt2":
        return _gpt2(config, state)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = _rope_table(model, max_len)
    shape = Shape(
        family=family,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        norm="rms",
        norm_eps=config.rms_norm_eps,
        activation="silu",
        rotary_dim=rope[0].shape[-1],
    )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ChatError(
            f"exporting a {config.model_type} model with hidden_act={config.hidden_act} is not supported yet"
        )
    embed = state["model.embed_tokens.weight"]
    top = {
        "embed": embed,
        "pos_embed": None,
        "norm_w": state["model.norm.weight"],
        "norm_b": None,
        "lm_head": _untied_head(state, embed),
    }
    layers = []
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        if family == "phi3":  # already fused: qkv_proj, gate_up_proj (gate first)
            wqkv, bqkv = state[a + "qkv_proj.weight"], state.get(a + "qkv_proj.bias")
            wup, bup = state[m + "gate_up_proj.weight"], state.get(m + "gate_up_proj.bias")
        else:
            wqkv, bqkv = _cat(state, [a + "q_proj", a + "k_proj", a + "v_proj"])
            wup, bup = _cat(state, [m + "gate_proj", m + "up_proj"])
        layers.append(
            {
                "ln1": state[p + "input_layernorm.weight"],
                "ln1_b": None,
                "wqkv": wqkv,
                "bqkv": bqkv,
                "wo": state[a + "o_proj.weight"],
                "bo": state.get(a + "o_proj.bias"),
                "ln2": state[p + "post_attention_layernorm.weight"],
                "ln2_b": None,
                "wup": wup,
                "bup": bup,
                "wdown": state[m + "down_proj.weight"],
                "bdown": state.get(m + "down_proj.bias"),
            }
        )
    return shape, top, layers, rope


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


def _rope_table(model, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions 0..max_len-1 from the model's own rotary module (so every RoPE scaling
    transformers knows is honoured), with the rotate-half sign folded into sin."""
    rotary = model.model.rotary_emb
    positions = torch.arange(max_len).unsqueeze(0)
    probe = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary(probe, positions)
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
    return shape, top, layers, None
