"""Test-only start-up hook (on PYTHONPATH of launched processes): skip DeepSpeed's shared-memory op.

DeepSpeed JIT-compiles a shared-memory all-reduce op for CPU runs (about 2 minutes on a fresh
machine) that only its inference all-reduce uses; training collectives go through torch.distributed
(gloo). Scripts we own patch it directly (gate_setups.setup_deepspeed_on_cpu); this hook does the same
for integration scripts launched unchanged, by patching ``deepspeed.comm.torch`` right after it loads.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

TARGET = "deepspeed.comm.torch"


class _PatchShmOp(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            module.build_shm_op = lambda: None

        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _PatchShmOp())
