"""Export a Hugging Face causal LM to a TorchScript artifact directory for chat: python -m chat.export MODEL OUTDIR

Usage:
  chat.export MODEL OUTDIR [--device=DEVICE] [--dtype=DTYPE] [--max-len=N] [--quantize=KIND] [--verify]
  chat.export (-h | --help)

Arguments:
  MODEL            a local model directory, a GGUF file or a Hugging Face Hub id (llama, mistral, qwen2,
                   qwen3, phi3, gemma2, gemma3_text, granite, olmo2, smollm3, gpt2)
  OUTDIR           where the artifact goes; `chat --model MODEL_DIR` finds it by itself when OUTDIR is
                   MODEL_DIR/torchscript/DEVICE-DTYPE, and `chat --model OUTDIR` runs it from anywhere

Options:
  --device=DEVICE  cpu or cuda: the artifact runs only there [default: cpu]
  --dtype=DTYPE    float32, bfloat16 or float16 [default: float32]
  --max-len=N      most tokens per conversation; default: the model's own context (a chat's KV cache grows
                   to it as the conversation does)
  --quantize=KIND  int8: matmul weights as int8 with a scale per row, about half the bytes of bfloat16 and
                   faster decode; int4: groups of 32 weights with a step and an offset (the head int8),
                   bfloat16 only, about a third of the bytes (CPU only; --verify then compares with
                   transformers on the same rounded weights)
  --verify         compare 32 greedy tokens on a few prompts with transformers; fail on a differing token
  -h --help        show this
"""

from __future__ import annotations

import sys

from docopt import DocoptExit, docopt

from chat.errors import ChatError, UsageError


def main() -> int:
    try:
        args = docopt(__doc__)
    except DocoptExit:
        print("chat.export: give MODEL and OUTDIR, and only the options --help lists", file=sys.stderr)
        return 2
    try:
        max_len = None
        if args["--max-len"] is not None:
            max_len = int(args["--max-len"]) if args["--max-len"].isdigit() else 0
            if max_len <= 0:
                raise UsageError(f"--max-len={args['--max-len']}: give a whole number above 0")
        from chat.export import export, stderr_progress

        export(
            args["MODEL"],
            args["OUTDIR"],
            device=args["--device"],
            dtype=args["--dtype"],
            max_len=max_len,
            quantize=args["--quantize"],
            verify=args["--verify"],
            progress=stderr_progress(),
        )
    except ChatError as why:
        print(f"chat.export: {why}", file=sys.stderr)
        return why.exit_code
    except KeyboardInterrupt:
        print("chat.export: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
