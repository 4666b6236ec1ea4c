"""peft_gates: finetuning by sparsification (FineGates) as a PEFT tuner, with a pruning merge.

``import peft_gates`` registers the ``PEFT_GATES`` adapter type with PEFT, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModel*`` handle gate adapters like any other.
"""

from ._registration import register
from .config import GateConfig, GatePeftType
from .layer import GateLayer
from .model import GateModel
from .stats import GateStats, gate_statistics

register()

__all__ = ["GateConfig", "GateLayer", "GateModel", "GatePeftType", "GateStats", "gate_statistics"]
__version__ = "0.1.0"
