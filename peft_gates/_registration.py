"""Make the ``PEFT_GATES`` type known to PEFT's registries at ``import peft_gates``.

``peft.utils.register_peft_method`` only accepts members of PEFT's closed ``PeftType`` enum, and
patching that enum breaks on Python 3.13. The mappings it fills are plain dicts keyed by the type,
so we insert our own ``str``-enum member into them directly, idempotently.
"""

from __future__ import annotations

from peft import mapping

from .config import GateConfig, GatePeftType
from .model import GateModel


def register() -> None:
    """Insert config, tuner and parameter prefix of ``PEFT_GATES`` into PEFT's mappings (idempotent)."""
    key = GatePeftType.PEFT_GATES
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] = GateConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] = GateModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] = GateModel.prefix
