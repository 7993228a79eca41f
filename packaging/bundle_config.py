"""What the standalone bundle leaves out, in one place: read by packaging/chat.spec and by
tests/test_packaging.py (which checks that nothing a TorchScript chat imports is excluded).

The bundle runs `chat` on TorchScript artifacts: torch (CPU), tokenizers, jinja2 and docopt. Everything
below is either never imported on that path or only imported inside functions that path never calls.
"""

from __future__ import annotations

# Python packages the bundle must not contain. A name excludes the module and all its submodules.
EXCLUDES = [
    # The transformers backend and its stack: not used by the TorchScript path. A bundle given a
    # plain Hugging Face model says so (chat's backend selection reports transformers as missing).
    "transformers",
    "huggingface_hub",
    "safetensors",
    "accelerate",
    "gguf",
    "hf_xet",
    "requests",
    "httpx",
    "httpx2",
    "httpcore2",
    "urllib3",
    "tqdm",
    "regex",
    "yaml",
    "fsspec",
    "filelock",
    "pydantic",
    "pydantic_core",
    "rich",
    "typer",
    "click",
    "psutil",
    # torch's optional dependencies, imported only by torch.compile, torch.fx's symbolic shapes,
    # ONNX export and the like. numpy: torch imports it when present but does not need it (the
    # runtime hook silences torch's "Failed to initialize NumPy" warning).
    "numpy",
    "sympy",
    "mpmath",
    "networkx",
    "optree",
    "triton",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "torchvision",
    "torchaudio",
    "torchtext",
    "tensorboard",
    "caffe2",
    "scipy",
    "pandas",
    "PIL",
    "matplotlib",
    "IPython",
    # torch pieces for compiling, exporting, training at scale and testing: never imported by
    # `import torch` or `torch.jit.load`, and they pull in sympy, numpy and a C++ toolchain.
    "torch._inductor",
    "torch._dynamo",
    "torch.onnx",
    "torch._numpy",
    "torch._lazy",
    "torch._vendor.quack",
    "torch._export.serde",
    "torch._export.passes",
    "torch._export.db",
    "torch.export.pt2_archive",
    "torch.export.experimental",
    # torch.utils.checkpoint imports torch.testing._internal.logging_tensor: keep the package, drop the suite.
    "torch.testing._internal.distributed",
    "torch.testing._internal.generated",
    "torch.testing._internal.opinfo",
    "torch.testing._internal.optests",
    "torch.testing._internal.codegen",
    "torch.testing._internal.test_module",
    "torch.testing._internal.data",
    "torch.testing._internal.common_methods_invocations",
    "torch.testing._internal.common_utils",
    "torch.testing._internal.common_modules",
    "torch.testing._internal.common_nn",
    "torch.testing._internal.common_quantization",
    "torch.testing._internal.common_device_type",
    "torch.testing._internal.common_optimizers",
    "torch.testing._internal.common_distributed",
    "torch.testing._internal.common_fsdp",
    "torch.testing._internal.common_mps",
    "torch.testing._internal.triton_utils",
    "torch.testing._internal.jit_metaprogramming_utils",
    "torch.testing._internal.jit_utils",
    "torch.utils.tensorboard",
    "torch.utils.benchmark",
    "torch.utils.bottleneck",
    "torch.utils.cpp_extension",
    "torch.utils.hipify",
    "torch.utils.model_dump",
    "torch.utils.viz",
    "torch.utils._sympy",
    "torch.utils._strobelight",
    "torch.distributed.tensor",
    "torch.distributed.fsdp",
    "torch.distributed.checkpoint",
    "torch.distributed.elastic",
    "torch.distributed.pipelining",
    "torch.distributed.launcher",
    "torch.distributed.run",
    "torch.distributed.optim",
    "torch.distributed.nn",
    "torch.distributed._shard",
    "torch.distributed._sharded_tensor",
    "torch.distributed._sharding_spec",
    "torch.distributed._tools",
    "torch.distributed._symmetric_memory",
    "torch.distributed._local_tensor",
    "torch.distributed._composable",
    "torch.distributed.flight_recorder",
    "torch.distributed.debug",
    "torch.ao.quantization.fx",
    "torch.ao.quantization.pt2e",
    "torch.ao.quantization.quantizer",
    "torch.ao.ns",
    "torch.ao.pruning",
    "torch.backends._nnapi",
    "torch.fx.experimental.migrate_gradual_types",
    "torch.fx.passes.tests",
    # Development tools and standard-library parts nothing here uses.
    "pytest",
    "_pytest",
    "pexpect",
    "ptyprocess",
    "setuptools",
    "pkg_resources",
    "_distutils_hack",
    "distutils",
    "pip",
    "tkinter",
    "_tkinter",
    "idlelib",
    "lib2to3",
    "pydoc_data",
    "ensurepip",
    "venv",
    "turtle",
    "turtledemo",
    "sqlite3",
    "_sqlite3",
]

# Files under torch/lib that are torch's own test fixtures, not needed to run anything.
TORCH_LIB_EXCLUDES = [
    "libjitbackend_test.so",
    "libtorchbind_test.so",
    "libbackend_with_compiler.so",
    "libaoti_custom_ops.so",
]

# Excluded modules that torch (or site) imports when they are installed and does without otherwise:
# tests/test_packaging.py allows these to show up in a venv's TorchScript run.
OPTIONAL_IMPORTS = ["numpy", "tqdm", "_distutils_hack"]


def _matches(module: str, names: list[str]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in names)


def excluded(module: str) -> bool:
    """Whether `module` is left out of the bundle by EXCLUDES."""
    return _matches(module, EXCLUDES)


def optional(module: str) -> bool:
    """Whether `module` is an optional import that the bundle may lack."""
    return _matches(module, OPTIONAL_IMPORTS)
