"""Gate statistics: how much of the model the gates would remove, per layer and in total."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import gates
from .pruning import DEFAULT_MULTIPLE_OF, plan_pruning


@dataclass
class SideStats:
    """Counts for one gate vector (the rows or the columns of one layer).

    ``regularized`` is False for the scale gates of ``GateConfig.scale_gates``, which the sparsity
    term leaves alone; their ``term`` is reported but counts in no total. ``open_mass`` is the sum of
    the open probabilities and ``weight`` the weights one closed gate removes, which the global
    sparsity scope weighs the gates by (1 under the per-layer scope).
    """

    gates: int
    open: int
    closed: int
    fractional: int
    term: float
    regularized: bool = True
    open_mass: float = 0.0
    weight: float = 1.0

    @property
    def closed_fraction(self) -> float:
        return self.closed / self.gates if self.gates else 0.0


@dataclass
class LayerStats:
    name: str
    sides: dict[str, SideStats]

    @property
    def regularized_sides(self) -> list[SideStats]:
        return [s for s in self.sides.values() if s.regularized]

    @property
    def sparsity_loss(self) -> float:
        """This layer's term: the mean of ``|mean p - keep|`` over its sides under the sparsity term."""
        sides = self.regularized_sides
        return sum(s.term for s in sides) / len(sides) if sides else 0.0


@dataclass
class GateStats:
    """Statistics of one adapter. ``removable_parameters`` comes from the pruning plan."""

    adapter_name: str
    target_sparsity: float
    layers: list[LayerStats]
    total_parameters: int
    removable_parameters: int | None = None
    #: the merge's ``multiple_of`` that ``removable_parameters`` was planned with
    removable_multiple_of: int | None = None
    extra: dict = field(default_factory=dict)
    sparsity_scope: str = "layer"

    def _sum(self, attr: str, regularized_only: bool = False) -> int:
        return sum(
            getattr(s, attr)
            for layer in self.layers
            for s in layer.sides.values()
            if s.regularized or not regularized_only
        )

    @property
    def num_gates(self) -> int:
        return self._sum("gates")

    @property
    def scale_gates(self) -> int:
        """Gates outside the sparsity term (``GateConfig.scale_gates``)."""
        return self.num_gates - self._sum("gates", regularized_only=True)

    @property
    def closed_gates(self) -> int:
        """Closed gates under the sparsity term (closed scale gates zero weights but are not counted)."""
        return self._sum("closed", regularized_only=True)

    @property
    def fractional_gates(self) -> int:
        return self._sum("fractional")

    @property
    def realized_sparsity(self) -> float:
        """Fraction of the gates under the sparsity term whose eval value is exactly 0 (vs the target)."""
        total = self._sum("gates", regularized_only=True)
        return self.closed_gates / total if total else 0.0

    @property
    def fractional_fraction(self) -> float:
        return self.fractional_gates / self.num_gates if self.num_gates else 0.0

    @property
    def sparsity_loss(self) -> float:
        """The unweighted sparsity term (what lambda multiplies): the mean of the layers' terms, or under
        the global scope ``|sum w p / sum w - keep|`` over every gate under the term."""
        if self.sparsity_scope == "global":
            sides = [s for layer in self.layers for s in layer.regularized_sides]
            total = sum(s.weight * s.gates for s in sides)
            mass = sum(s.weight * s.open_mass for s in sides)
            return abs(mass / total - (1.0 - self.target_sparsity)) if total else 0.0
        layers = [layer for layer in self.layers if layer.regularized_sides]
        return sum(layer.sparsity_loss for layer in layers) / len(layers) if layers else 0.0

    @property
    def removable_fraction(self) -> float | None:
        if self.removable_parameters is None or not self.total_parameters:
            return None
        return self.removable_parameters / self.total_parameters

    def to_dict(self) -> dict:
        return {
            "adapter_name": self.adapter_name,
            "target_sparsity": self.target_sparsity,
            "realized_sparsity": self.realized_sparsity,
            "num_gates": self.num_gates,
            "scale_gates": self.scale_gates,
            "closed_gates": self.closed_gates,
            "fractional_gates": self.fractional_gates,
            "sparsity_loss": self.sparsity_loss,
            "total_parameters": self.total_parameters,
            "removable_parameters": self.removable_parameters,
            "removable_fraction": self.removable_fraction,
            "removable_multiple_of": self.removable_multiple_of,
            "layers": [
                {"name": layer.name, **{side: asdict(s) for side, s in layer.sides.items()}}
                for layer in self.layers
            ],
            **self.extra,
        }

    def summary(self) -> str:
        """A few lines for logs and the main job."""
        scales = f" ({self.scale_gates} of them scale gates)" if self.scale_gates else ""
        lines = [
            f"adapter {self.adapter_name!r}: {self.num_gates} gates in {len(self.layers)} layers{scales}",
            f"  closed {self.closed_gates} ({100 * self.realized_sparsity:.1f}%, target "
            f"{100 * self.target_sparsity:.0f}% of open probability mass), "
            f"fractional {self.fractional_gates} ({100 * self.fractional_fraction:.1f}%)",
            f"  sparsity loss {self.sparsity_loss:.4f}",
        ]
        if self.removable_parameters is not None:
            lines.append(
                f"  removable by the merge (multiple_of={self.removable_multiple_of}): "
                f"{self.removable_parameters:,} of {self.total_parameters:,} parameters "
                f"({100 * self.removable_fraction:.1f}%)"
            )
        return "\n".join(lines)


@contextlib.contextmanager
def gathered(params: list[nn.Parameter]):
    """Gather ZeRO-3 partitioned parameters for reading (a no-op for ordinary parameters)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def _side_stats(
    theta: torch.Tensor, keep: float, sigma: float, regularized: bool, weight: float
) -> SideStats:
    theta = theta.detach().float()
    z = gates.eval_value(theta)
    closed = int((z == 0).sum())
    opened = int((z == 1).sum())
    return SideStats(
        gates=theta.numel(),
        open=opened,
        closed=closed,
        fractional=theta.numel() - opened - closed,
        term=float(gates.sparsity_term(theta, keep, sigma)),
        regularized=regularized,
        open_mass=float(gates.open_probability(theta, sigma).sum()),
        weight=weight,
    )


def _unwrap_tuner(model: nn.Module):
    """The GateModel inside a PeftModel (or the GateModel itself)."""
    from .model import GateModel

    for module in (model, getattr(model, "base_model", None)):
        if isinstance(module, GateModel):
            return module
    raise TypeError(
        f"expected a PeftModel with a peft_gates adapter (get_peft_model(model, GateConfig(...))), "
        f"got {type(model).__name__}"
    )


def gate_statistics(
    model: nn.Module,
    adapter_name: str | None = None,
    with_plan: bool = True,
    multiple_of: int = DEFAULT_MULTIPLE_OF,
) -> GateStats:
    """Per-layer and total gate statistics of ``adapter_name`` (default: the active adapter).

    ``with_plan`` also asks the pruning planner how many parameters the merge would remove with kept
    MLP widths rounded up to ``multiple_of`` (pass the value you will merge with: the count depends on
    it); it is cheap (no weights are touched) but skipped for architectures the planner does not know.
    """
    tuner = _unwrap_tuner(model)
    adapter_name = adapter_name or tuner.active_adapters[0]
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"no adapter named {adapter_name!r}; available: {sorted(tuner.peft_config)}")
    config = tuner.peft_config[adapter_name]
    layers = []
    for name, layer in tuner.gated_layers(adapter_name).items():
        vectors = layer.gate_vectors(adapter_name)
        slots = layer.budget_slots.get(adapter_name, {})
        with gathered(list(vectors.values())):
            sides = {
                side: _side_stats(
                    theta,
                    config.keep,
                    config.sigma,
                    side in layer.regularized[adapter_name],
                    slots[side][1] if side in slots else 1.0,
                )
                for side, theta in vectors.items()
            }
        layers.append(LayerStats(name=name, sides=sides))
    total = sum(
        p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        for n, p in tuner.model.named_parameters()
        if tuner.prefix not in n
    )
    scope = config.sparsity_scope
    stats = GateStats(adapter_name, config.target_sparsity, layers, total, sparsity_scope=scope)
    if with_plan:
        vectors = [
            p
            for layer in tuner.gated_layers(adapter_name).values()
            for p in layer.gate_vectors(adapter_name).values()
        ]
        with gathered(vectors):  # the planner reads every gate: gather them under ZeRO-3
            plan = plan_pruning(model, adapter_name, multiple_of=multiple_of)
        if plan.supported:
            # the plan counts logical weights (packed 4-bit ones unpacked, modules_to_save once)
            stats.removable_parameters = plan.params_removed
            stats.total_parameters = plan.params_total_before
            stats.removable_multiple_of = multiple_of
    return stats


__all__ = ["GateStats", "LayerStats", "SideStats", "gate_statistics"]
