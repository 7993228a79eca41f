"""Build chat's native CPU kernels for this machine and torch: python -m chat.native [options]

Usage:
  chat.native [--into=DIR] [--force]
  chat.native (-h | --help)

Options:
  --into=DIR  where to put the library (default: chat/native/lib in the package when writable, else the
              user cache; $CHAT_NATIVE_DIR when set)
  --force     build even if the library is there

Exit 0 with the library's path, or where the kernels do not build (another OS or architecture: chat's
ops then run on torch's own kernels); 1 when the build fails; 2 for an unknown option.
"""

from __future__ import annotations

import sys
from pathlib import Path

from docopt import DocoptExit, docopt

from chat import native
from chat.errors import ChatError


def main() -> int:
    try:
        args = docopt(__doc__)
    except DocoptExit:
        print("chat.native: only the options --help lists: --into=DIR, --force", file=sys.stderr)
        return 2
    reason = native.buildable()
    if reason:
        print(f"chat.native: not built: {reason}; torch's own kernels will run chat's ops")
        return 0
    into = Path(args["--into"]) if args["--into"] else None
    existing = native.find_library()
    if existing and not args["--force"] and (into is None or existing.parent == into.resolve()):
        print(existing)
        return 0
    print("chat.native: building chat's native kernels (about 10 s) ...", file=sys.stderr, flush=True)
    try:
        print(native.build(into, force=args["--force"]))
    except ChatError as why:
        print(f"chat.native: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
