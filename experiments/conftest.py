"""The product tests' tiny models (tests/conftest.py) for the experiments, which live apart so that CI skips them.

tests/ goes on sys.path for helpers; tests/conftest.py is loaded under another name, since a second module
called conftest would clash with this one.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

_spec = importlib.util.spec_from_file_location("product_conftest", TESTS / "conftest.py")
_product = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_product)

tiny_llama = _product.tiny_llama
