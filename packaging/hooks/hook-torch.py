"""PyInstaller hook for torch that replaces pyinstaller-hooks-contrib's (hooks from the spec's
hookspath take priority over it).

The contributed hook collects every torch submodule as a hidden import, every data file and every
shared library, which drags in torch.compile, ONNX export, the test suite, sympy and numpy: a
858 MB onedir that takes ~5 s to start. The bundle only runs `torch.jit.load`ed TorchScript on the
CPU, so this hook lets PyInstaller's import analysis find the modules (what `import torch` imports
statically) and adds only the shared libraries in torch/lib that torch loads at run time. Packages
that the analysis would pull in through function-level imports are cut in packaging/bundle_config.py.
"""

import os
import sys

from PyInstaller.utils.hooks import get_package_paths

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bundle_config import TORCH_LIB_EXCLUDES

# Source files as well as compiled modules: on import, torch reads the source of its config modules
# (torch.utils._config_module uses inspect.getsource), so compiled-only torch fails to import.
module_collection_mode = "pyz+py"
warn_on_missing_hiddenimports = False

# torch/__init__.py loads libtorch_global_deps.so with ctypes, and libtorch_cpu.so needs libgomp;
# collect torch/lib whole (less the test fixtures) rather than rely on binary dependency analysis.
_lib = os.path.join(get_package_paths("torch")[1], "lib")
binaries = [
    (os.path.join(_lib, name), os.path.join("torch", "lib"))
    for name in sorted(os.listdir(_lib))
    if (name.endswith(".so") or ".so." in name) and name not in TORCH_LIB_EXCLUDES
]
# torch/__init__.py checks at import that torch/bin/torch_shm_manager exists (tensor sharing between
# processes uses it); it is the only file from torch/bin that is needed.
binaries.append((os.path.join(get_package_paths("torch")[1], "bin", "torch_shm_manager"), os.path.join("torch", "bin")))
datas = []
hiddenimports = []

# As the contributed hook does: no symlinks from torch/lib to the top level (they confuse torch's
# search for its own libraries).
bindepend_symlink_suppression = ["**/torch/lib/*.so*"]
