"""``GateConfig``: the PEFT config of a stochastic-gate adapter."""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig


class GatePeftType(str, enum.Enum):
    """Our own PEFT type: PEFT's ``PeftType`` enum is closed to plugins (see ``_registration``).

    A ``str`` enum member hashes and compares equal to its value, so the ``"PEFT_GATES"`` read back
    from ``adapter_config.json`` finds the registered classes. The value deliberately names the
    package, so a fresh process that forgot ``import peft_gates`` fails with ``KeyError: 'PEFT_GATES'``.
    """

    PEFT_GATES = "PEFT_GATES"


PLACEMENTS = ("rows", "columns", "both", "units")
Placement = Literal["rows", "columns", "both", "units"]
SCALE_SIDES = ("none", "rows", "columns", "both")
ScaleSides = Literal["none", "rows", "columns", "both"]
SPARSITY_SCOPES = ("layer", "global")
SparsityScope = Literal["layer", "global"]
#: Float fields: a string from YAML/argparse or a NaN/inf would only fail (or poison training) much later.
_NUMBER_FIELDS = (
    "target_sparsity",
    "sparsity_weight",
    "init_mean",
    "init_std",
    "noise_std",
    "sigma",
    "lora_alpha",
)


def _suffix_matches(module_name: str, suffixes) -> list[str]:
    """The ``suffixes`` that name ``module_name`` (whole dotted components, as PEFT matches targets)."""
    return [k for k in suffixes if module_name == k or module_name.endswith("." + k)]


@dataclass
class GateConfig(PeftConfig):
    """Configuration of a FineGates adapter: trainable gates on rows/columns of frozen Linears.

    Args:
        target_modules: modules to gate, PEFT semantics (list of name suffixes, a regex, or
            ``"all-linear"``). ``None`` gates every Linear but the output layer with ``placement``
            ``rows``/``columns``/``both``, and the units of the architecture table with ``"units"``.
        exclude_modules: modules never to gate (PEFT semantics).
        modules_to_save: extra modules trained in full and saved (e.g. ``["classifier"]``).
        placement: where gates sit. ``"both"`` (the paper's): one gate per output row and per input
            column of every targeted Linear. ``"rows"`` / ``"columns"``: one side only. ``"units"``:
            one gate per removable unit (an MLP neuron, an attention head or GQA group), placed as a
            (grouped) column gate on the MLP output and attention output projections, so training
            targets exactly what the merge can remove.
        scale_gates: with ``placement="units"`` only: also gate these sides (``"rows"``, ``"columns"``,
            ``"both"``) of every Linear of the blocks with *scale gates*, which the sparsity term leaves
            alone. They are learned per-channel scales in [0, 1] that fold into the kept weights at
            merge time: more expressive finetuning (as many gates as ``placement="both"``) while the
            sparsity term still acts only on removable units. ``"none"`` (default) adds none.
        column_group_size: consecutive input columns that share one column gate; an int for every
            gated module, or a mapping from module-name suffix to size (``{"o_proj": 64}`` gates
            whole heads). Filled from the architecture table in ``"units"`` placement, where its keys
            are the unit modules and its values their unit widths.
        target_sparsity: in [0, 1); the sparsity term drives the mean open probability of every gate
            vector to ``1 - target_sparsity``. It targets probability mass, not counts: report the
            realized sparsity (``gate_statistics``).
        sparsity_weight: lambda, the weight of the sparsity term in the total loss (>= 0).
        sparsity_scope: ``"layer"`` (default, the paper's): every gate vector (one side of one layer)
            is pulled to the target on its own, so every layer loses the same share. ``"global"``: one
            term over all gates under the sparsity term, each weighted by the weights its closing
            removes (a whole unit's slices in every coupled module under ``placement="units"``; its row
            or column of the gated Linear otherwise), so the layers share one parameter budget and the
            task decides where to cut. ``target_sparsity`` is then the share of the gated parameters.
        init_mean, init_std: raw gate init ``theta ~ N(init_mean, init_std^2)`` (paper: 1.0, 0.1; at
            1.0 every gate starts fully open, so the wrapped model equals the base model).
        noise_std: std of the training noise added to every gate (paper: 0.1).
        sigma: scale of the open probability ``Phi((mu + 0.5) / sigma)`` in the regularizer (0.5).
        sparsity_start_step: optimizer steps before the sparsity term starts (the paper's delay).
        sparsity_warmup_steps: steps over which lambda then ramps linearly from 0 to its value.
        recovery_start_step: optimizer step from which the gates train *as the pruned model*: no
            training noise and no sparsity term, so a closed gate is exactly 0 in training as at eval
            and gets no more gradient (it stays closed, up to the momentum its optimizer still carries),
            while the open gates, the update of ``lora_rank`` and any ``modules_to_save`` keep training on
            exactly the model the merge will produce (a recovery phase, as after one-shot pruning).
            0 (default): no recovery phase, the paper's method. Must come after ``sparsity_start_step``,
            or nothing ever closes.
        bias: ``"none"``, ``"all"`` or ``"peft_gates_only"`` (biases of gated layers), as in LoRA.
        lora_rank: rank ``r`` of a trainable low-rank update inside the gates of every gated Linear:
            ``y = ((x * z_c) (W + alpha / r * B A)^T + b) * z_r`` (``B`` starts at zero, so the model
            still starts as the base model). 0 (default) is the paper's method, gates only. The update
            sits between the gates, so a closed gate removes its slice of ``B A`` too and the pruning
            merge folds ``W + alpha / r * B A`` into the kept weights: the pruned model has no extra
            weights. It adds LoRA's trainable parameters (``r * (in + out)`` per Linear), for when gates
            alone fit the task less well than LoRA (measured: it helps short runs, not full budgets; see
            docs/benchmarks.md); train ``A`` and ``B`` at a LoRA-sized lr
            (:func:`peft_gates.training.optimizer_groups`), not the gates' much larger one.
        lora_alpha: ``alpha`` of that update (scale ``alpha / r``, as in LoRA).
    """

    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to gate."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules not to gate."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra trained modules."})
    placement: Placement = field(default="both", metadata={"help": f"One of {PLACEMENTS}."})
    scale_gates: ScaleSides = field(default="none", metadata={"help": f"One of {SCALE_SIDES} (units only)."})
    column_group_size: int | dict[str, int] = field(default=1, metadata={"help": "Columns per gate."})
    target_sparsity: float = field(default=0.3, metadata={"help": "Fraction of gates to close."})
    sparsity_weight: float = field(default=50.0, metadata={"help": "lambda of the sparsity term."})
    sparsity_scope: SparsityScope = field(
        default="layer", metadata={"help": f"One of {SPARSITY_SCOPES}: a target per layer, or one shared."}
    )
    init_mean: float = field(default=1.0, metadata={"help": "Mean of the raw gate init."})
    init_std: float = field(default=0.1, metadata={"help": "Std of the raw gate init."})
    noise_std: float = field(default=0.1, metadata={"help": "Std of the training noise."})
    sigma: float = field(default=0.5, metadata={"help": "Scale of the open probability."})
    sparsity_start_step: int = field(default=0, metadata={"help": "Steps before the term starts."})
    sparsity_warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up of lambda."})
    recovery_start_step: int = field(
        default=0, metadata={"help": "Step from which the gates train as the pruned model (0: never)."}
    )
    bias: str = field(default="none", metadata={"help": "'none', 'all' or 'peft_gates_only'."})
    lora_rank: int = field(
        default=0, metadata={"help": "Rank of a low-rank update inside the gates (0: none)."}
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "alpha of that update (scale alpha / rank)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = GatePeftType.PEFT_GATES
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    def _validate(self) -> None:
        def bad(field_name: str, value, fix: str) -> ValueError:
            return ValueError(f"GateConfig.{field_name}={value!r} is invalid: {fix}")

        if self.placement not in PLACEMENTS:
            raise bad("placement", self.placement, f"use one of {PLACEMENTS}")
        if self.scale_gates not in SCALE_SIDES:
            raise bad("scale_gates", self.scale_gates, f"use one of {SCALE_SIDES}")
        if self.scale_gates != "none" and self.placement != "units":
            raise bad(
                "scale_gates",
                self.scale_gates,
                f"scale gates only add to placement='units' (placement={self.placement!r} already gates "
                "every side it names, all under the sparsity term); use placement='units' or "
                "scale_gates='none'",
            )
        if self.sparsity_scope not in SPARSITY_SCOPES:
            raise bad(
                "sparsity_scope",
                self.sparsity_scope,
                f"use 'layer' (a target per gate vector, the paper's) or 'global' (one parameter budget "
                f"shared by all layers); one of {SPARSITY_SCOPES}",
            )
        for name in _NUMBER_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                hint = (
                    " (YAML reads 1e2 without a dot as a string: write 100.0)"
                    if isinstance(value, str)
                    else ""
                )
                raise bad(name, value, f"it must be a number, not a {type(value).__name__}{hint}")
            if not math.isfinite(value):
                raise bad(name, value, "it must be a finite number")
        if not 0.0 <= self.target_sparsity < 1.0:
            raise bad("target_sparsity", self.target_sparsity, "it must lie in [0, 1)")
        for name in ("sparsity_weight", "init_std", "noise_std"):
            if getattr(self, name) < 0:
                raise bad(name, getattr(self, name), "it must be >= 0")
        if self.sigma <= 0:
            raise bad("sigma", self.sigma, "it must be > 0")
        for name in ("sparsity_start_step", "sparsity_warmup_steps", "recovery_start_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise bad(name, value, "it must be a non-negative integer")
        if 0 < self.recovery_start_step <= self.sparsity_start_step:
            raise bad(
                "recovery_start_step",
                self.recovery_start_step,
                f"the recovery phase would begin before the sparsity term starts (sparsity_start_step="
                f"{self.sparsity_start_step}), so no gate would ever close; use a step after it, or 0 for "
                "no recovery phase",
            )
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank < 0:
            raise bad("lora_rank", self.lora_rank, "it must be a non-negative integer (0: gates only)")
        if not self.lora_alpha > 0:
            raise bad("lora_alpha", self.lora_alpha, "it must be > 0")
        if self.bias not in ("none", "all", "peft_gates_only"):
            raise bad("bias", self.bias, "use 'none', 'all' or 'peft_gates_only'")
        sizes = (
            self.column_group_size.values()
            if isinstance(self.column_group_size, dict)
            else [self.column_group_size]
        )
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
            raise bad("column_group_size", self.column_group_size, "group sizes must be integers >= 1")
        if self.placement == "rows" and self.column_group_size != 1:
            raise bad(
                "column_group_size",
                self.column_group_size,
                "it groups column gates, and placement='rows' has none; leave it at 1 or gate columns too "
                "(placement='columns' or 'both')",
            )

    @property
    def keep(self) -> float:
        """Target fraction of open gates: ``1 - target_sparsity``."""
        return 1.0 - self.target_sparsity

    @property
    def lora_scaling(self) -> float:
        """Scale of the low-rank update: ``lora_alpha / lora_rank`` (0 without one)."""
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def is_unit_module(self, module_name: str) -> bool:
        """Whether ``module_name`` carries unit gates (``"units"`` placement: a key of column_group_size)."""
        if self.placement != "units" or not isinstance(self.column_group_size, dict):
            return False
        return bool(_suffix_matches(module_name, self.column_group_size))

    def gate_sides(self, module_name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(sides gated, sides under the sparsity term)`` of ``module_name`` (``rows``/``columns``).

        Every gate is under the sparsity term except the scale gates of ``placement="units"``: there
        only the (grouped) column gates of the unit modules are.
        """
        if self.placement != "units":
            sides = {"rows": ("rows",), "columns": ("columns",), "both": ("rows", "columns")}[self.placement]
            return sides, sides
        unit = self.is_unit_module(module_name)
        rows = self.scale_gates in ("rows", "both")
        columns = unit or self.scale_gates in ("columns", "both")
        sides = tuple(s for s, on in (("rows", rows), ("columns", columns)) if on)
        return sides, ("columns",) if unit else ()

    def group_size_for(self, module_name: str) -> int:
        """Column group size for ``module_name`` (longest matching suffix wins; default 1)."""
        if isinstance(self.column_group_size, int):
            return self.column_group_size
        matches = _suffix_matches(module_name, self.column_group_size)
        return self.column_group_size[max(matches, key=len)] if matches else 1

    def in_recovery(self, step: int) -> bool:
        """Whether optimizer step ``step`` lies in the recovery phase (see ``recovery_start_step``)."""
        return 0 < self.recovery_start_step <= step

    def lambda_at(self, step: int) -> float:
        """lambda after the delayed start and the warm-up, at optimizer step ``step`` (0 in recovery)."""
        if step < self.sparsity_start_step or self.in_recovery(step):
            return 0.0
        if self.sparsity_warmup_steps == 0:
            return self.sparsity_weight
        ramp = (step - self.sparsity_start_step + 1) / self.sparsity_warmup_steps
        return self.sparsity_weight * min(1.0, ramp)
