"""``GateModel``: the PEFT tuner that wraps targeted Linears in gate layers."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .architectures import arch_spec, attention_shape, unit_weights
from .config import GateConfig, _suffix_matches
from .gates import OpenMassBudget, SparsityCoefficient
from .layer import GateLayer, Linear, in_out_features
from .pruning import DEFAULT_MULTIPLE_OF, model_spec
from .quantization import disable_cpu_repacking


def _dotted_match(a: str, b: str) -> bool:
    """Whether one name is the other's dotted suffix (``mlp.down_proj`` and ``down_proj``)."""
    return a.endswith("." + b) or b.endswith("." + a)


def _unit_modules(requested: str | set[str] | list[str], units: list[str], model_type: str) -> set[str]:
    """The unit modules (keys of ``units``) that ``GateConfig.target_modules`` names, one per name.

    A name selects the unit module it equals, else the one it is a dotted suffix or an extension of.
    A selection is refused when another unit module's name ends with the chosen one, because gates are
    matched by name suffix (BERT's MLP output ``output.dense`` ends ``attention.output.dense``).
    """
    names = {requested} if isinstance(requested, str) else set(requested)

    def refuse(why: str) -> ValueError:
        return ValueError(
            f"GateConfig.target_modules={sorted(names)} with placement='units' {why}; the unit outputs of "
            f"{model_type} are {units} (MLP neurons, attention heads); name one or both, or use None for both"
        )

    chosen = set()
    for name in names:
        found = [name] if name in units else [u for u in units if _dotted_match(u, name)]
        if len(found) != 1:
            raise refuse(f"must name exactly one unit output per entry ({name!r} names {found or 'none'})")
        chosen.update(found)
    for unit in chosen:
        clash = [u for u in units if u not in chosen and u.endswith("." + unit)]
        if clash:
            raise refuse(
                f"names {unit!r}, which {clash[0]!r} also ends with, so gates matched by suffix would "
                "land on both; gate both unit outputs (target_modules=None)"
            )
    return chosen


class GateModel(BaseTuner):
    """Stochastic-gate tuner (FineGates, arXiv 2602.09169) for ``get_peft_model``.

    Example:
        >>> import peft_gates
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base, peft_gates.GateConfig(target_modules="all-linear"))
        >>> peft_gates.gate_statistics(model).summary()
    """

    prefix: str = "peft_gates_"
    tuner_layer_cls = GateLayer
    target_module_mapping: dict[str, list[str]] = {}

    @property
    def sparsity_coefficients(self) -> dict[str, SparsityCoefficient]:
        """Per-adapter strength of the injected sparsity gradient; shared by reference with every layer."""
        return self.__dict__.setdefault("_sparsity_coefficients", {})

    def _prepare_adapter_config(self, peft_config: GateConfig, model_config: dict) -> GateConfig:
        if peft_config.placement != "units":
            if peft_config.target_modules is None:
                peft_config.target_modules = "all-linear"
            return peft_config
        model_type = model_config.get("model_type")
        spec = arch_spec(model_type)
        if spec is None:
            from .architectures import ARCHITECTURES

            raise ValueError(
                f"placement='units' needs the coupled structures of model_type={model_type!r}, which "
                f"peft_gates does not know (known: {sorted(ARCHITECTURES)}); use placement='both' (or "
                "'rows'/'columns') or add the family to peft_gates.architectures.ARCHITECTURES"
            )
        shape = attention_shape(spec, SimpleNamespace(**model_config))
        widths = {spec.mlp_out: 1, spec.attn_out: shape.unit_width}
        prepared = peft_config.column_group_size
        if isinstance(prepared, dict) and prepared:
            if prepared == {k: widths.get(k) for k in prepared} and isinstance(
                peft_config.target_modules, (set, list)
            ):
                return peft_config  # resolved before (a saved adapter being loaded, or a reused config)
            raise ValueError(
                f"GateConfig.column_group_size={prepared!r} with placement='units' does not match the unit "
                f"widths of this {model_type} model ({widths}): a GateConfig that get_peft_model already "
                "filled in for another model, or an adapter of another model; placement='units' fills "
                "column_group_size and target_modules itself, so pass a fresh GateConfig(...) per model"
            )
        if prepared != 1:
            raise ValueError(
                f"GateConfig.column_group_size={prepared!r} is set by placement='units' itself (each unit "
                "module's unit width, from the architecture table); leave it at its default 1"
            )
        requested = peft_config.target_modules
        if requested is None or requested == "all-linear":
            chosen = set(widths)
        else:
            chosen = _unit_modules(requested, sorted(widths), model_type)
        peft_config.column_group_size = {unit: widths[unit] for unit in chosen}
        scaled = set(spec.block_linears()) if peft_config.scale_gates != "none" else set()
        peft_config.target_modules = chosen | scaled
        return peft_config

    def _create_and_replace(
        self,
        peft_config: GateConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        sides, regularized = peft_config.gate_sides(current_key)
        group = peft_config.group_size_for(current_key)
        if isinstance(target, GateLayer):
            target.update_layer(adapter_name, peft_config, sides, regularized, group_size=group)
            return
        try:
            in_out_features(target)
        except TypeError as err:
            raise ValueError(
                f"target module {current_key!r} is a {type(target).__name__}, not a Linear; remove it from "
                "GateConfig.target_modules (gates sit on rows/columns of Linear-like layers)"
            ) from err
        new_module = Linear(target, adapter_name, peft_config, sides, regularized, group_size=group)
        new_module.sparsity = self.sparsity_coefficients
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: nn.Module, config: GateConfig, adapter_name: str) -> None:
        # bitsandbytes would otherwise repack 4-bit weights on the first eval forward on CPUs with
        # AVX512-BF16 into a layout without backward: gates would silently stop training.
        disable_cpu_repacking(model)
        layers = self.gated_layers(adapter_name)
        if isinstance(config.column_group_size, dict):
            unused = [k for k in config.column_group_size if not any(_suffix_matches(n, [k]) for n in layers)]
            if unused:
                raise ValueError(
                    f"GateConfig.column_group_size names {unused}, which match(es) no gated module (gated: "
                    f"{sorted(layers)[:3]}...); use suffixes of the gated modules' names, e.g. 'o_proj'"
                )
        terms = sum(1 for layer in layers.values() if layer.regularized[adapter_name])
        coefficient = SparsityCoefficient(config.lambda_at(0), num_terms=terms)
        if config.sparsity_scope == "global":
            coefficient.budget = self._global_budget(layers, config, adapter_name)
        self.sparsity_coefficients[adapter_name] = coefficient

    def _global_budget(
        self, layers: dict[str, GateLayer], config: GateConfig, adapter_name: str
    ) -> OpenMassBudget:
        """Give every gate vector under the sparsity term a slot and a per-gate weight (the weights its
        closing removes: a whole unit under ``placement="units"``, its own row or column otherwise)."""
        units: dict[str, int] = {}
        if config.placement == "units":
            spec, shape = model_spec(self.model)
            units = unit_weights(spec, shape, getattr(self.model.config, spec.hidden_attr))
        vector_weights: list[float] = []
        for name, layer in layers.items():
            slots = {}
            for side in layer.regularized[adapter_name]:
                theta = layer.gate_vectors(adapter_name)[side]
                unit = _suffix_matches(name, units)
                if unit:  # the longest match: BERT's "attention.output.dense" also ends "output.dense"
                    per_gate = units[max(unit, key=len)]
                elif side == "rows":
                    per_gate = layer.in_features
                else:
                    per_gate = layer.out_features * layer.column_group[adapter_name]
                slots[side] = (len(vector_weights), float(per_gate))
                vector_weights.append(float(per_gate) * getattr(theta, "ds_numel", theta.numel()))
            layer.budget_slots[adapter_name] = slots
        return OpenMassBudget(vector_weights)

    def gated_layers(self, adapter_name: str | None = None) -> dict[str, GateLayer]:
        """Qualified name -> gate layer, for the layers that carry gates of ``adapter_name``."""
        adapter_name = adapter_name or self.active_adapters[0]
        return {
            name: module
            for name, module in self.model.named_modules()
            if isinstance(module, GateLayer) and module.gate_vectors(adapter_name)
        }

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        multiple_of: int = DEFAULT_MULTIPLE_OF,
        min_units: int = 1,
        dtype: torch.dtype | None = None,
    ) -> nn.Module:
        """The pruning merge: fold the gates, cut closed neurons and heads, return a smaller plain model.

        Kept MLP widths are rounded up to ``multiple_of`` (odd widths make GPUs slower than dense);
        at least ``min_units`` attention units and neurons stay in every layer. Gate values are always
        checked for being finite, so ``safe_merge`` adds nothing. Quantized bases are dequantized into a
        dense model of ``dtype`` (default: the base's compute dtype).
        """
        from .pruning import prune_and_unload

        return prune_and_unload(
            self,
            adapter_name=adapter_names,
            multiple_of=multiple_of,
            min_units=min_units,
            progressbar=progressbar,
            dtype=dtype,
        )

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """PEFT's in-place merge, refusing adapter names this model does not have (PEFT skips them)."""
        unknown = [name for name in adapter_names or () if name not in self.peft_config]
        if unknown:
            raise ValueError(
                f"adapter_names={adapter_names!r} names {unknown}, not adapters of this model; pass some of "
                f"{sorted(self.peft_config)} (or None for the active ones)"
            )
        super().merge_adapter(adapter_names, safe_merge=safe_merge)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # On unload BaseTuner copies child.weight onto the unwrapped module; a modules_to_save head without
        # .weight (RobertaClassificationHead) would raise AttributeError there.
        if not isinstance(new_module, GateLayer) and not hasattr(new_module, "base_layer"):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.sparsity_coefficients.pop(adapter_name, None)

    def set_sparsity_step(
        self, step: int, gradient_accumulation_steps: int = 1, loss_scale: float = 1.0
    ) -> None:
        """Set lambda for optimizer step ``step`` (delay, warm-up, recovery phase) and the gradient scale.

        Call once per optimizer step in a hand-written loop; :func:`peft_gates.attach` does it for
        ``Trainer``/``SFTTrainer``. ``gradient_accumulation_steps`` divides the injected gradient like
        the averaged loss is divided; ``loss_scale`` is the current fp16 loss scale (1.0 otherwise).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r} is invalid: pass the optimizer step, an integer >= 0")
        if gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps} must be >= 1")
        for name, coef in self.sparsity_coefficients.items():
            coef.weight = self.peft_config[name].lambda_at(step)
            coef.recovering = self.peft_config[name].in_recovery(step)
            coef.grad_scale = loss_scale / gradient_accumulation_steps
