"""The lean decoder: the module chat exports to TorchScript and runs, shared by the exporter, the TorchScript
backend and chat.native's fallback ops.

- shape.py: what a model is (sizes and the family's traits, as data), stored in the artifact's manifest;
  standard library only.
- ops.py: the small torch steps (norms, RoPE, soft-capping) the modules and the fallback ops share.
- layers.py: norms, projections and residual adds, one class per form.
- attention.py: q/k norms, RoPE and attention over the KV cache, one class per form.
- model.py: a layer, the whole model, and `build`, which picks every form once for a device, dtype and kernels.
- cache.py: giving a module (eager or loaded TorchScript) its KV cache and growing it.
- pages.py: a loaded module's weights, and KV caches, in memory backed by 2 MiB pages (CPU decode streams them).
"""
