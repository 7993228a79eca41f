"""Text from outside (a terminal, a pipe, the command line, a saved file) made safe to tokenize and save.

Bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape), and JSON can spell them
("\\udcff"); the tokenizers refuse them and a UTF-8 file cannot hold them. They become U+FFFD.
"""

from __future__ import annotations

import re

SURROGATES = re.compile("[\ud800-\udfff]")


def readable(text: str) -> str:
    return SURROGATES.sub("\ufffd", text)
