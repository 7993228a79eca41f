#!/usr/bin/env python3
"""Export a model to a TorchScript artifact for chat: the same command line as `python -m chat.export`.

Installed chat (pip, the Docker images) needs no script: run `python -m chat.export MODEL OUTDIR [options]`.
This one is for a source checkout, where chat may not be installed.
"""

from __future__ import annotations

import sys
from importlib.util import find_spec
from pathlib import Path

if find_spec("chat") is None:  # not installed: use the package of the checkout this script is in
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chat.export.__main__ import main

if __name__ == "__main__":
    raise SystemExit(main())
