#!/usr/bin/env python3
"""What rounding the matmul weights (export --quantize int8 or int4) costs a model, measured in transformers.

Usage:
  quantize_quality.py [--model=DIR] [--tokens=N]
  quantize_quality.py (-h | --help)

Options:
  --model=DIR   a model directory [default: models/smollm2-135m-instruct]
  --tokens=N    greedy tokens compared per prompt [default: 64]

Runs the model as it is and with its weights rounded as export rounds them (chat.export.quantize) to int8 and
to int4, all in float32 on the CPU, and for scale the model in bfloat16; prints the mean negative
log-likelihood per token of a fixed passage of prose (and its perplexity), for a few chat prompts how many
greedy tokens of each agree with the original's before the first that differs, and each one's greedy reply
to the first prompt.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from docopt import docopt

PASSAGE = (
    "The river rises in the hills to the north, where rain falls on most days of the year, and runs south "
    "through a wide valley of farms and small towns before it reaches the sea. For centuries it carried "
    "grain and timber to the port, and the towns along its banks grew rich on the trade. When the railway "
    "came, the boats slowly disappeared, and the towns turned to other work: some to making furniture, "
    "others to tourism, as visitors came to walk the old towpaths and eat in the inns that once fed the "
    "boatmen. Today the river is quieter than it has been for a thousand years. Herons stand in the "
    "shallows, and in the evenings the water is still enough to hold the colour of the sky."
)
PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a cache is.",
    "Give three tips for learning a new language.",
    "What is 17 times 3?",
)


def main() -> int:
    args = docopt(__doc__)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from chat.artifact import QUANTIZATIONS
    from chat.export.quantize import round_model_weights
    from chat.tokenizer import FastTokenizer

    model_dir = Path(args["--model"])
    tokens = int(args["--tokens"])
    tokenizer = FastTokenizer(model_dir)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    models = {
        name: AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        for name, dtype in (
            ("original", torch.float32),
            ("int8", torch.float32),
            ("int4", torch.float32),
            ("bfloat16", torch.bfloat16),
        )
    }
    for kind in QUANTIZATIONS:
        round_model_weights(models[kind], kind)

    passage = torch.tensor([tokenizer.encode(PASSAGE, add_special_tokens=False)])
    print(f"{model_dir.name}: negative log-likelihood per token of a {passage.size(1)}-token passage")
    for name, model in models.items():
        with torch.no_grad():
            nll = float(model(input_ids=passage, labels=passage).loss)
        print(f"  {name:8} {nll:.4f} (perplexity {torch.tensor(nll).exp():.2f})")

    others = [name for name in models if name != "original"]
    print(
        f"greedy tokens that agree with the original's before the first difference (of {tokens}): {', '.join(others)}"
    )
    first_replies = {}
    for text in PROMPTS:
        prompt = tokenizer.render([{"role": "user", "content": text}]) if tokenizer.has_chat_template else text
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=not tokenizer.has_chat_template)])
        replies = {}
        for name, model in models.items():
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            replies[name] = out[0, ids.size(1) :].tolist()
        first_replies = first_replies or replies
        same = "".join(f"{agreeing(replies['original'], replies[name]):4d}" for name in others)
        print(f"{same}  {text}")
    print(f"greedy replies to {PROMPTS[0]!r}:")
    for name, reply in first_replies.items():
        print(f"  {name:8} {tokenizer.decode(reply)!r}")
    return 0


def agreeing(reference: list[int], other: list[int]) -> int:
    """How many tokens of `other` agree with `reference` before the first that differs."""
    return next((i for i, (a, b) in enumerate(zip(reference, other, strict=True)) if a != b), len(reference))


if __name__ == "__main__":
    raise SystemExit(main())
