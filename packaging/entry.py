"""Entry script of the standalone bundle (packaging/chat.spec): the `chat` console script.

The bundle leaves transformers out (packaging/bundle_config.py), so it runs TorchScript artifacts only.
Should a model need transformers anyway (a Hub id, or a directory without an artifact), say so in one
line instead of a traceback.
"""

import sys

from chat.cli import main

LEFT_OUT = {"transformers", "huggingface_hub", "safetensors", "accelerate"}


def bundled_main() -> int:
    try:
        return main()
    except ModuleNotFoundError as why:
        if (why.name or "").split(".")[0] not in LEFT_OUT:
            raise
        print(
            "chat: error: this standalone chat runs TorchScript artifacts only (it has no transformers); "
            "name an artifact directory, or a model directory with one in torchscript/ "
            "(export one where chat is installed with pip: python -m chat.export MODEL OUTDIR), "
            "or install chat with pip for other models",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(bundled_main())
