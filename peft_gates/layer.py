"""Gate layers: a frozen Linear (``nn.Linear``, GPT-2 ``Conv1D``, bitsandbytes 4/8-bit) with gates.

``y = ((x * z_c) W^T + b) * z_r``: column gates ``z_c`` scale the inputs, row gates ``z_r`` scale the
outputs (and so the bias). Gates are fp32 parameters; their values are cast to the activation dtype.
One wrapper serves every base layer type because it only calls the base layer, never its weight.

With ``GateConfig.lora_rank > 0`` a low-rank update sits between the gates,
``y = ((x * z_c) (W + s B A)^T + b) * z_r``, computed beside the base layer (``s B A`` never touches the
frozen, possibly quantized, weight until the merge folds it in).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import gates
from .config import GateConfig
from .gates import SparsityCoefficient
from .quantization import is_quantized_linear


def in_out_features(base_layer: nn.Module) -> tuple[int, int]:
    """Logical (in, out) sizes; never ``weight.shape`` (bnb packs 4-bit weights, ZeRO-3 empties them)."""
    if isinstance(base_layer, Conv1D):
        return base_layer.nx, base_layer.nf
    if hasattr(base_layer, "in_features") and hasattr(base_layer, "out_features"):
        return base_layer.in_features, base_layer.out_features
    raise TypeError(f"cannot gate {type(base_layer).__name__}: only Linear-like layers have rows and columns")


def combine(a: torch.Tensor | None, b: torch.Tensor | None, op) -> torch.Tensor | None:
    """``op(a, b)``, or whichever of the two is not None: per-adapter gates and updates joined into one."""
    return b if a is None else a if b is None else op(a, b)


def _fold_weight(
    base_layer: nn.Module,
    z_row: torch.Tensor | None,
    z_col: torch.Tensor | None,
    delta: torch.Tensor | None = None,
) -> None:
    """``W <- Diag(z_row) (W + delta) Diag(z_col)`` (and ``b <- z_row * b``) on a float base layer, in place.

    ``delta`` is (out, in), whatever the base layer's storage orientation.
    """
    weight = base_layer.weight.data
    w = weight.float()
    if isinstance(base_layer, Conv1D):  # weight is (in, out)
        w = w if delta is None else w + delta.t().to(w.device)
        w = w * (z_col[:, None] if z_col is not None else 1) * (z_row[None, :] if z_row is not None else 1)
    else:
        w = w if delta is None else w + delta.to(w.device)
        w = w * (z_row[:, None] if z_row is not None else 1) * (z_col[None, :] if z_col is not None else 1)
    weight.copy_(w.to(weight.dtype))
    if base_layer.bias is not None and z_row is not None:
        bias = base_layer.bias.data
        bias.copy_((bias.float() * z_row).to(bias.dtype))


class GateLayer(BaseTunerLayer):
    """Per-adapter row and column gate vectors (and optional low-rank update) on one Linear-like layer."""

    adapter_layer_names = ("peft_gates_row", "peft_gates_col", "peft_gates_lora_A", "peft_gates_lora_B")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.peft_gates_row = nn.ParameterDict({})
        self.peft_gates_col = nn.ParameterDict({})
        # low-rank update (GateConfig.lora_rank): A is (r, in), B is (out, r) and starts at zero
        self.peft_gates_lora_A = nn.ParameterDict({})
        self.peft_gates_lora_B = nn.ParameterDict({})
        self.lora_scaling: dict[str, float] = {}
        self.column_group: dict[str, int] = {}
        # sides ("rows"/"columns") of each adapter under the sparsity term; the others are scale gates
        self.regularized: dict[str, tuple[str, ...]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = in_out_features(self.get_base_layer())
        # Shared with the tuner, which updates lambda / gradient scale in place (see training.py).
        self.sparsity: dict[str, SparsityCoefficient] = {}
        # global sparsity scope: side -> (slot in the shared budget, weights removed per closed gate)
        self.budget_slots: dict[str, dict[str, tuple[int, float]]] = {}
        self.gate_settings: dict[str, GateConfig] = {}

    def update_layer(
        self,
        adapter_name: str,
        config: GateConfig,
        sides: tuple[str, ...],
        regularized: tuple[str, ...],
        group_size: int,
    ) -> None:
        """Create the gate vectors of ``adapter_name`` on ``sides`` (fully open at the paper's init).

        ``regularized`` names the sides the sparsity term acts on (see ``GateConfig.gate_sides``).
        """
        rows, columns = "rows" in sides, "columns" in sides
        if columns and self.in_features % group_size != 0:
            raise ValueError(
                f"GateConfig.column_group_size={group_size} does not divide in_features={self.in_features}; "
                "use a divisor of the layer's input size (e.g. the head_dim)"
            )
        if rows:
            self.peft_gates_row[adapter_name] = nn.Parameter(
                gates.init_theta(self.out_features, config.init_mean, config.init_std)
            )
        if columns:
            self.peft_gates_col[adapter_name] = nn.Parameter(
                gates.init_theta(self.in_features // group_size, config.init_mean, config.init_std)
            )
        if config.lora_rank:
            lora_a = torch.empty(config.lora_rank, self.in_features, dtype=torch.float32)
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))  # LoRA's init; B = 0 keeps the base model
            self.peft_gates_lora_A[adapter_name] = nn.Parameter(lora_a)
            self.peft_gates_lora_B[adapter_name] = nn.Parameter(
                torch.zeros(self.out_features, config.lora_rank, dtype=torch.float32)
            )
            self.lora_scaling[adapter_name] = config.lora_scaling
        self.column_group[adapter_name] = group_size
        self.regularized[adapter_name] = tuple(side for side in regularized if side in sides)
        self.gate_settings[adapter_name] = config
        device = next((p.device for p in self.get_base_layer().parameters() if p.device.type != "meta"), None)
        if device is not None:
            for store in (
                self.peft_gates_row,
                self.peft_gates_col,
                self.peft_gates_lora_A,
                self.peft_gates_lora_B,
            ):
                if adapter_name in store:
                    store[adapter_name] = nn.Parameter(store[adapter_name].data.to(device))
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def gate_vectors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """The raw gate parameters of ``adapter_name`` by side (``"rows"``, ``"columns"``)."""
        out = {}
        if adapter_name in self.peft_gates_row:
            out["rows"] = self.peft_gates_row[adapter_name]
        if adapter_name in self.peft_gates_col:
            out["columns"] = self.peft_gates_col[adapter_name]
        return out

    def eval_gates(self, adapter_name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Deterministic (row, column) gate values, columns expanded to ``in_features``."""
        vectors = self.gate_vectors(adapter_name)
        z_row = gates.eval_value(vectors["rows"].detach().float()) if "rows" in vectors else None
        z_col = None
        if "columns" in vectors:
            z_col = gates.eval_value(vectors["columns"].detach().float())
            z_col = z_col.repeat_interleave(self.column_group[adapter_name])
        return z_row, z_col

    def delta_weight(self, adapter_name: str) -> torch.Tensor | None:
        """The low-rank update ``s B A`` of ``adapter_name`` as an (out, in) fp32 tensor; None without one."""
        if adapter_name not in self.peft_gates_lora_A:
            return None
        lora_a = self.peft_gates_lora_A[adapter_name].detach().float()
        lora_b = self.peft_gates_lora_B[adapter_name].detach().float()
        return (lora_b @ lora_a.to(lora_b.device)) * self.lora_scaling[adapter_name]

    def _low_rank(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``s (x A^T) B^T``: the update's share of the output, without forming ``B A``."""
        lora_a, lora_b = self.peft_gates_lora_A[adapter_name], self.peft_gates_lora_B[adapter_name]
        return (
            nn.functional.linear(nn.functional.linear(x.to(lora_a.dtype), lora_a), lora_b)
            * self.lora_scaling[adapter_name]
        )

    def _gate_values(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Gate values by side for this forward: noisy, with the sparsity gradient attached, when
        training (noise-free in the recovery phase, where lambda is 0 too); the deterministic eval values
        (still differentiable) otherwise."""
        vectors = self.gate_vectors(adapter_name)
        if not vectors:  # an active adapter that does not gate this layer (other target_modules)
            return {}
        if not self.training:
            return {side: gates.eval_value(theta) for side, theta in vectors.items()}
        cfg = self.gate_settings[adapter_name]
        regularized = self.regularized[adapter_name]
        shared = self.sparsity.get(adapter_name)
        coefs = dict.fromkeys(vectors, 0.0)
        noise_std, budget = cfg.noise_std, None
        if shared is not None:
            if shared.recovering:  # train as the pruned model: closed gates exactly 0, no gradient
                noise_std = 0.0
            budget = shared.budget
            for side in regularized:
                if budget is None:
                    coefs[side] = shared.per_vector(len(regularized))
                    continue
                slot, weight = self.budget_slots[adapter_name][side]
                theta = vectors[side]
                budget.record(slot, weight * gates.open_probability(theta.detach(), cfg.sigma).sum())
                coefs[side] = shared.weight * shared.grad_scale * weight / budget.total
        return {
            side: gates.sample_with_sparsity_grad(theta, noise_std, cfg.keep, cfg.sigma, coefs[side], budget)
            for side, theta in vectors.items()
        }

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the eval gates of the active (or given) adapters into the base weight, exactly.

        Only float bases fold in place; quantized bases are merged by ``GateModel.merge_and_unload``,
        which dequantizes into a new dense model.
        """
        base = self.get_base_layer()
        if is_quantized_linear(base) or not isinstance(base, (nn.Linear, Conv1D)):
            raise ValueError(
                f"cannot fold gates in place into {type(base).__name__}; use merge_and_unload(), which "
                "dequantizes into a new pruned dense model"
            )
        names = [
            name
            for name in (self.active_adapters if adapter_names is None else adapter_names)
            if name not in self.merged_adapters and self.gate_vectors(name)
        ]
        if not names:
            return
        # The adapters merged together fold as the forward applies them when all are active: gates
        # multiply, updates add, all inside one Diag(z_row) (W + sum of updates) Diag(z_col).
        z_row = z_col = delta = None
        for name in names:
            rows, cols = self.eval_gates(name)
            z_row, z_col = combine(z_row, rows, torch.mul), combine(z_col, cols, torch.mul)
            delta = combine(delta, self.delta_weight(name), torch.add)
        if safe_merge and any(t is not None and not torch.isfinite(t).all() for t in (z_row, z_col, delta)):
            raise ValueError(f"non-finite gate or update values in adapters {names}")
        _fold_weight(base, z_row, z_col, delta)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        raise NotImplementedError(
            "gate folding is not invertible (closed gates zero weights); keep an unmerged copy instead"
        )


class Linear(nn.Module, GateLayer):
    """Gated Linear-like layer (``nn.Linear``, ``Conv1D``, bitsandbytes ``Linear4bit``/``Linear8bitLt``)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: GateConfig,
        sides: tuple[str, ...],
        regularized: tuple[str, ...],
        group_size: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        GateLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, sides, regularized, group_size=group_size)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return self.base_layer(x, *args, **kwargs)
        z_row = z_col = None
        for name in self.active_adapters:
            values = self._gate_values(name)
            col, row = values.get("columns"), values.get("rows")
            if col is not None:
                col = col.repeat_interleave(self.column_group[name]) if self.column_group[name] > 1 else col
                z_col = col if z_col is None else z_col * col
            if row is not None:
                z_row = row if z_row is None else z_row * row
        if z_col is not None:
            x = x * z_col.to(x.dtype)
        out = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.peft_gates_lora_A:
                out = out + self._low_rank(x, name).to(out.dtype)
        return out if z_row is None else out * z_row.to(out.dtype)

    def __repr__(self) -> str:
        return "peft_gates." + super().__repr__()
