"""peft_gates: finetuning by sparsification (FineGates) as a PEFT tuner, with a pruning merge.

``import peft_gates`` registers the ``PEFT_GATES`` adapter type with PEFT, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModel*`` handle gate adapters like any other.
"""

from ._registration import register
from .config import GateConfig, GatePeftType
from .export import register_pruned_architectures, save_pruned
from .layer import GateLayer
from .model import GateModel
from .pruning import DEFAULT_MULTIPLE_OF, PrunePlan, plan_pruning, prune_and_unload
from .report import write_report
from .stats import GateStats, gate_statistics
from .training import GateTrainerCallback, attach, set_sparsity_step

register()
register_pruned_architectures()

__all__ = [
    "DEFAULT_MULTIPLE_OF",
    "GateConfig",
    "GateLayer",
    "GateModel",
    "GatePeftType",
    "GateStats",
    "GateTrainerCallback",
    "PrunePlan",
    "attach",
    "gate_statistics",
    "plan_pruning",
    "prune_and_unload",
    "save_pruned",
    "set_sparsity_step",
    "write_report",
]
__version__ = "0.1.0"
