"""Wiring the FineGates sparsity objective into training loops.

The sparsity term never travels through the loss: :class:`peft_gates.gates.GateSample` adds its
gradient in the backward pass of every gate sample (the one place that works unchanged under DDP,
ZeRO-2/3 and reentrant checkpointing). What a loop must still provide, once per optimizer step, is
the *strength* of that gradient: lambda after its schedule (delay, warm-up), divided by the gradient
accumulation steps and multiplied by the fp16 loss scale, exactly as a term added to the (averaged,
scaled) loss would be. :meth:`peft_gates.GateModel.set_sparsity_step` takes those numbers.

* ``transformers.Trainer`` / TRL ``SFTTrainer`` (and other Trainer subclasses): one line,
  :func:`attach`, after building the trainer and before ``train()``.
* A hand-written (accelerate) loop: call :func:`set_sparsity_step` at the start of every optimizer
  step (see ``integrations/accelerate/train_loop.py``).

Metrics (added to the Trainer's logs, ``state.log_history`` and every reporter): ``sparsity_loss``
(the unweighted regularizer, mean over gated layers of ``|mean p - keep|``), ``sparsity_lambda`` (lambda
applied in the last step), ``sparsity_realized`` (fraction of the gates under the sparsity term whose
eval value is exactly 0; scale gates are left out),
``gates_fractional`` (fraction strictly between 0 and 1: learned scales) and ``params_removable``
(parameters in the MLP neurons and attention units that the pruning merge would remove now).
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .layer import GateLayer
from .model import GateModel
from .stats import gate_statistics, gathered

if TYPE_CHECKING:
    from transformers import Trainer

logger = logging.getLogger(__name__)

METRIC_KEYS = (
    "sparsity_loss",
    "sparsity_lambda",
    "sparsity_realized",
    "gates_fractional",
    "params_removable",
)


# --------------------------------------------------------------------------------------------- model access


def find_gate_model(model: nn.Module) -> GateModel | None:
    """The :class:`GateModel` tuner inside ``model``, through DDP, DeepSpeed, compile and PEFT wrappers."""
    seen: set[int] = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, GateModel):
            return model
        for attr in ("base_model", "module", "_orig_mod"):  # PeftModel, DDP / DeepSpeedEngine, torch.compile
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module) and inner is not model:
                model = inner
                break
        else:
            return None
    return None


def gate_model_of(model: nn.Module) -> GateModel:
    """Like :func:`find_gate_model` but raises a clear error when the model carries no gate adapter."""
    found = find_gate_model(model)
    if found is None:
        raise TypeError(
            f"{type(model).__name__} carries no peft_gates adapter; wrap the model first with "
            "peft.get_peft_model(model, peft_gates.GateConfig(...)) (or pass peft_config=GateConfig(...) to "
            "SFTTrainer) and `import peft_gates` before building it"
        )
    return found


def _adapter(gate_model: GateModel, adapter_name: str | None) -> str:
    """``adapter_name`` (default: the active adapter), refused when the model has no such adapter."""
    if adapter_name is not None and adapter_name not in gate_model.peft_config:
        raise ValueError(
            f"adapter_name={adapter_name!r} is not an adapter of this model; pass one of "
            f"{sorted(gate_model.peft_config)} (or None for the active adapter)"
        )
    return adapter_name or gate_model.active_adapters[0]


def _gate_parameters(gate_model: GateModel, adapter_name: str) -> list[nn.Parameter]:
    return [
        p
        for layer in gate_model.gated_layers(adapter_name).values()
        for p in layer.gate_vectors(adapter_name).values()
    ]


# --------------------------------------------------------------------------------------------- optimizer

#: Name fragment of the low-rank update's parameters (``GateConfig.lora_rank``); gates are the other
#: ``GateModel.prefix`` parameters.
LORA_PARAMETER_TAG = "peft_gates_lora_"


def optimizer_groups(
    model: nn.Module,
    lr: float,
    lora_lr: float | None = None,
    weight_decay: float = 0.0,
    other_lr: float | None = None,
    scale_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for a gated model: gates, the low-rank update, everything else.

    Gates train at ``lr`` and never with weight decay (decay pulls a raw gate theta to 0, i.e. every
    gate towards a half-open 0.5 scale). The low-rank update of ``GateConfig.lora_rank`` trains at
    ``lora_lr``: Adam moves every parameter by about its lr per step, and the gates' lr (1e-2 and up,
    so that gates can travel far enough to close) would wreck a LoRA-style update, which wants ~1e-4.
    ``scale_lr`` (default ``lr``) is the lr of the scale gates of ``GateConfig.scale_gates``, the
    gates outside the sparsity term: with an update present they need not move at the lr that closes
    units, and ``scale_lr=0`` keeps them at 1 as mere hosts of the update (measured on SmolLM2: no
    accuracy gained by that; docs/benchmarks.md). Other trainables (a classifier head, biases,
    ``modules_to_save``) take ``other_lr`` (default ``lr``) and ``weight_decay``. Empty groups are
    left out.
    """
    scale_ids = {
        id(param)
        for module in model.modules()
        if isinstance(module, GateLayer)
        for adapter, regularized in module.regularized.items()
        for side, param in module.gate_vectors(adapter).items()
        if side not in regularized
    }
    for name, value in (("lr", lr), ("lora_lr", lora_lr), ("other_lr", other_lr), ("scale_lr", scale_lr)):
        if value is not None and not (isinstance(value, numbers.Real) and 0 <= value < math.inf):
            raise ValueError(
                f"optimizer_groups({name}={value!r}) is invalid: use a finite number >= 0 "
                "(0 freezes its group)"
            )
    if scale_lr is not None:
        if not scale_ids:
            raise ValueError(
                f"scale_lr={scale_lr} but the model has no scale gates (GateConfig.scale_gates='none'); "
                "drop scale_lr, or use placement='units' with scale_gates='rows'/'columns'/'both'"
            )
    gates, scales, updates, other = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if LORA_PARAMETER_TAG in name:
            updates.append(param)
        elif scale_lr is not None and id(param) in scale_ids:
            scales.append(param)
        elif GateModel.prefix in name:
            gates.append(param)
        else:
            other.append(param)
    if updates and lora_lr is None:
        raise ValueError(
            f"the model has a low-rank update ({len(updates)} tensors, GateConfig.lora_rank > 0) but "
            "lora_lr=None; give it a LoRA-sized lr (e.g. lora_lr=2e-4), not the gates' one"
        )
    groups = [
        {"params": gates, "lr": lr, "weight_decay": 0.0},
        {"params": scales, "lr": scale_lr, "weight_decay": 0.0},
        {"params": updates, "lr": lora_lr, "weight_decay": weight_decay},
        {"params": other, "lr": lr if other_lr is None else other_lr, "weight_decay": weight_decay},
    ]
    return [group for group in groups if group["params"]]


# --------------------------------------------------------------------------------------------- metrics


@torch.no_grad()
def gate_metrics(
    model: nn.Module, adapter_name: str | None = None, removable_multiple_of: int | None = 1
) -> dict[str, float]:
    """Sparsity metrics of the gates of ``adapter_name`` now (keys: :data:`METRIC_KEYS`).

    ``params_removable`` is what the pruning merge would remove now (whole MLP neurons and attention
    units, :func:`peft_gates.pruning.plan_pruning`) with kept widths rounded up to multiples of
    ``removable_multiple_of`` (1: no rounding, the training-progress view; the merge's default is
    128). ``None`` leaves it out. Gathers ZeRO-3 partitioned gate vectors, so under ZeRO-3 every rank
    must call this together.
    """
    gate_model = gate_model_of(model)
    adapter_name = _adapter(gate_model, adapter_name)
    stats = gate_statistics(gate_model, adapter_name, with_plan=False)
    coef = gate_model.sparsity_coefficients.get(adapter_name)
    metrics = {
        "sparsity_loss": float(stats.sparsity_loss),
        "sparsity_lambda": float(coef.weight) if coef is not None else 0.0,
        "sparsity_realized": float(stats.realized_sparsity),
        "gates_fractional": float(stats.fractional_fraction),
    }
    if removable_multiple_of is not None:
        from .pruning import plan_pruning

        with gathered(_gate_parameters(gate_model, adapter_name)):
            plan = plan_pruning(gate_model, adapter_name, multiple_of=removable_multiple_of)
        metrics["params_removable"] = float(plan.params_removed)
    return metrics


# --------------------------------------------------------------------------------------------- loss scale


def _deepspeed_loss_scale(engine: Any) -> float:
    """Current fp16 loss scale of a DeepSpeed engine (1.0 for fp32/bf16)."""
    optimizer = getattr(engine, "optimizer", None)
    scaler = getattr(optimizer, "torch_autocast_gradscaler", None) or getattr(
        engine, "torch_autocast_z0_gradscaler", None
    )
    if scaler is not None:
        return float(scaler.get_scale())
    if getattr(optimizer, "custom_loss_scaler", False):
        return float(optimizer.external_loss_scale)
    loss_scaler = getattr(optimizer, "loss_scaler", None)
    if loss_scaler is not None:
        return float(loss_scaler.cur_scale)
    return float(getattr(optimizer, "cur_scale", 1.0))


def current_loss_scale(accelerator: Any = None, model: nn.Module | None = None) -> float:
    """The factor the backward pass multiplies the loss by right now (fp16 loss scaling), else 1.0.

    Looks at the accelerator's ``GradScaler`` (torch AMP fp16) and at a DeepSpeed engine (``model``
    if it is one, else the accelerator's).
    """
    engine = model if type(model).__name__ == "DeepSpeedEngine" else None
    if engine is None and accelerator is not None:
        wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
        engine = getattr(wrapped, "engine", None)
    if engine is not None:
        return _deepspeed_loss_scale(engine)
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        return float(scaler.get_scale())
    return 1.0


def set_sparsity_step(
    model: nn.Module,
    step: int,
    accelerator: Any = None,
    *,
    gradient_accumulation_steps: int | None = None,
    loss_scale: float | None = None,
) -> float:
    """For hand-written loops: set lambda and the gradient scale for optimizer step ``step``.

    Call at the start of every optimizer step (before its first micro-batch). Gradient accumulation
    steps default to ``accelerator.gradient_accumulation_steps`` (what ``accelerator.backward`` divides
    the loss by), the loss scale to :func:`current_loss_scale`. Without an accelerator, pass the number
    of micro-batches whose losses you average per step. Returns the lambda now in force.
    """
    gate_model = gate_model_of(model)
    if gradient_accumulation_steps is None:
        gradient_accumulation_steps = int(getattr(accelerator, "gradient_accumulation_steps", 1) or 1)
    if loss_scale is None:
        loss_scale = current_loss_scale(accelerator, model)
    gate_model.set_sparsity_step(step, gradient_accumulation_steps, loss_scale)
    coefs = gate_model.sparsity_coefficients
    return float(next(iter(coefs.values())).weight) if coefs else 0.0


# --------------------------------------------------------------------------------------------- checks


def _checkpointing(trainer: Trainer) -> tuple[bool, bool]:
    """(gradient checkpointing on, reentrant) as ``train()`` will configure it (it enables it there)."""
    args = trainer.args
    enabled = bool(getattr(args, "activation_checkpointing", getattr(args, "gradient_checkpointing", False)))
    # transformers 5 reads activation_checkpointing_kwargs (gradient_checkpointing_kwargs is an alias).
    kwargs = getattr(
        args, "activation_checkpointing_kwargs", getattr(args, "gradient_checkpointing_kwargs", None)
    )
    reentrant = bool((kwargs or {}).get("use_reentrant", False))  # transformers 5 default: non-reentrant
    if not enabled:  # enabled on the model by hand before building the Trainer
        for module in trainer.model.modules():
            func = getattr(module, "_gradient_checkpointing_func", None)
            if getattr(module, "gradient_checkpointing", False) is True and func is not None:
                enabled = True
                reentrant = bool(getattr(func, "keywords", {}).get("use_reentrant", False))
                break
    return enabled, reentrant


def _is_ddp(trainer: Trainer) -> bool:
    from accelerate.utils import DistributedType

    kind = trainer.accelerator.distributed_type
    return (
        kind != DistributedType.DEEPSPEED
        and kind.name.startswith("MULTI_")
        and trainer.accelerator.num_processes > 1
    )


def _is_sft_trainer(trainer: Trainer) -> bool:
    try:
        from trl import SFTTrainer
    except ImportError:  # TRL is optional
        return False
    return isinstance(trainer, SFTTrainer)


def check_trainer(trainer: Trainer, adapter_name: str | None = None) -> list[str]:
    """Refuse set-ups in which the sparsity term would silently not apply; return warnings for risky ones.

    Raises ``ValueError`` for: no peft_gates adapter, lambda > 0 with no gated layer, no trainable gate,
    merged gates, gates on ``lm_head`` under ``SFTTrainer`` (its fused LM head reads ``lm_head.weight``
    directly, so the gate layer never runs), and DDP with ``ddp_find_unused_parameters=True`` plus
    reentrant gradient checkpointing (DDP then fails with "mark a variable ready only once").
    """
    gate_model = gate_model_of(trainer.model)
    adapter_name = _adapter(gate_model, adapter_name)
    config = gate_model.peft_config[adapter_name]
    layers = gate_model.gated_layers(adapter_name)
    found: list[str] = []
    if not layers:
        if config.sparsity_weight > 0:
            raise ValueError(
                f"GateConfig.sparsity_weight={config.sparsity_weight} but adapter {adapter_name!r} gates "
                "no layer, so the sparsity term has nothing to act on; check GateConfig.target_modules "
                "against the model's module names (or set sparsity_weight=0)"
            )
        found.append(f"adapter {adapter_name!r} gates no layer: training changes no gate")
    params = _gate_parameters(gate_model, adapter_name)
    if params and not any(p.requires_grad for p in params):
        raise ValueError(
            f"no gate of adapter {adapter_name!r} is trainable (inference_mode=True, or the adapter is not "
            "the active one); create the adapter with inference_mode=False and make it active before training"
        )
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(
            f"gates are merged into {len(merged)} layers (e.g. {merged[0]}): merged gate layers run only "
            "the base layer, so nothing trains; train on an unmerged adapter and merge afterwards"
        )
    if _is_sft_trainer(trainer):
        output = (
            trainer.model.get_output_embeddings() if hasattr(trainer.model, "get_output_embeddings") else None
        )
        if isinstance(output, GateLayer) and output.gate_vectors(adapter_name):
            raise ValueError(
                "gates on the output layer (lm_head) do not train under TRL's SFTTrainer: its fused LM head "
                "computes log-probabilities from lm_head.weight directly, so the gate layer never runs and "
                "neither the task nor the sparsity gradient reaches its gates; add 'lm_head' to "
                "GateConfig.exclude_modules (or drop it from target_modules)"
            )
    checkpointing, reentrant = _checkpointing(trainer)
    if checkpointing and _is_ddp(trainer):
        handler = getattr(trainer.accelerator, "ddp_handler", None)
        find_unused = getattr(handler, "find_unused_parameters", trainer.args.ddp_find_unused_parameters)
        if find_unused and reentrant:
            raise ValueError(
                "DDP with ddp_find_unused_parameters=True and reentrant gradient checkpointing fails "
                "('Expected to mark a variable ready only once'): set "
                "TrainingArguments(ddp_find_unused_parameters=False) (transformers turns it on for any "
                "PeftModel), or use non-reentrant checkpointing"
            )
        if find_unused:
            found.append(
                "DDP with ddp_find_unused_parameters=True and gradient checkpointing: every gate is used in "
                "every step, so set TrainingArguments(ddp_find_unused_parameters=False) to skip the extra "
                "graph traversal (reentrant checkpointing fails with it)"
            )
    return found


def _recast_gates_fp32(gate_model: GateModel, adapter_name: str) -> int:
    """Cast gate vectors back to fp32 in place (same Parameter objects, so optimizer references stay valid).

    TRL's SFTTrainer casts every trainable parameter of a 4/8-bit model to bf16; near the decision point
    (theta ~ -0.55) bf16 spacing is ~0.004, so small Adam steps on the gates would round to nothing.
    """
    count = 0
    for param in _gate_parameters(gate_model, adapter_name):
        if param.dtype != torch.float32 and param.device.type != "meta" and not hasattr(param, "ds_id"):
            param.data = param.data.float()
            count += 1
    return count


# --------------------------------------------------------------------------------------------- callback


class GateTrainerCallback(TrainerCallback):
    """Sets the sparsity strength at each optimizer step and adds gate metrics to the trainer's logs.

    Installed by :func:`attach` as the FIRST callback, so its ``on_log`` adds the metrics to ``logs``
    before TensorBoard/W&B/the printer see them (it also completes the ``state.log_history`` entry,
    which ``Trainer.log`` copies before calling the callbacks). Holds no state worth saving: lambda is a
    function of ``state.global_step``, which ``resume_from_checkpoint`` restores.
    """

    def __init__(
        self,
        trainer: Trainer,
        adapter_name: str | None = None,
        log_metrics: bool = True,
        removable_multiple_of: int | None = 1,
    ) -> None:
        self.trainer = trainer
        self.adapter_name = adapter_name
        self.log_metrics = log_metrics
        self.removable_multiple_of = removable_multiple_of
        self._probe_handles: list[Any] = []
        self._ran: set[str] = set()
        self._probe_names: set[str] = set()

    # -- sparsity strength
    def _gradient_accumulation_steps(self, args: TrainingArguments) -> int:
        # The last optimizer step of an epoch may accumulate fewer micro-batches; the Trainer divides the
        # loss (or normalizes by the token count of the window) accordingly, so follow it.
        current = getattr(self.trainer, "current_gradient_accumulation_steps", None)
        return int(current or args.gradient_accumulation_steps)

    def _set_step(self, args: TrainingArguments, state: TrainerState) -> None:
        gate_model = gate_model_of(self.trainer.model)
        loss_scale = current_loss_scale(self.trainer.accelerator, self.trainer.model_wrapped)
        gate_model.set_sparsity_step(state.global_step, self._gradient_accumulation_steps(args), loss_scale)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._set_step(args, state)
        self._start_probe(state)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._set_step(args, state)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._probe_handles:
            self._finish_probe()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._remove_probe()

    # -- probe: did every gate layer run a differentiable training forward in the first step?
    def _start_probe(self, state: TrainerState) -> None:
        self._remove_probe()
        gate_model = gate_model_of(self.trainer.model)
        adapter_name = _adapter(gate_model, self.adapter_name)
        self._ran = set()

        def make_hook(name: str):
            def hook(module: GateLayer, inputs: Any, output: Any) -> None:
                # Counts only forwards that sample this adapter's gates with autograd on.
                active = (
                    not module.disable_adapters
                    and not module.merged
                    and adapter_name in module.active_adapters
                )
                if module.training and torch.is_grad_enabled() and active:
                    self._ran.add(name)

            return hook

        for name, layer in gate_model.gated_layers(adapter_name).items():
            self._probe_handles.append(layer.register_forward_hook(make_hook(name)))
        self._probe_names = set(gate_model.gated_layers(adapter_name))

    def _remove_probe(self) -> None:
        for handle in self._probe_handles:
            handle.remove()
        self._probe_handles = []

    def _finish_probe(self) -> None:
        self._remove_probe()
        missing = sorted(self._probe_names - self._ran)
        if not missing:
            return
        gate_model = gate_model_of(self.trainer.model)
        weight = gate_model.peft_config[_adapter(gate_model, self.adapter_name)].sparsity_weight
        message = (
            f"{len(missing)} of {len(self._probe_names)} gated layers (e.g. {missing[0]}) did not run a "
            "training forward with gradients in the first step, so neither the task nor the sparsity "
            "gradient reaches their gates. Causes: a fused kernel that reads the base weight instead of "
            "calling the layer (a fused LM head or MLP), adapters disabled in the forward, a layer the model "
            "does not use, or MoE experts not routed in that batch. Exclude those modules with "
            "GateConfig.exclude_modules or turn the fused path off."
        )
        if len(missing) == len(self._probe_names) and weight > 0:
            raise RuntimeError("no gate is trained: " + message)
        warnings.warn(message, stacklevel=2)

    # -- metrics
    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs
    ):
        if not self.log_metrics or logs is None or "loss" not in logs:
            return
        metrics = gate_metrics(self.trainer.model, self.adapter_name, self.removable_multiple_of)
        logs.update(metrics)
        # Trainer.log appended a copy of `logs` to log_history just before calling us: complete it too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            last = state.log_history[-1]
            if last.get("loss") == logs["loss"]:
                last.update(metrics)


def _group_the_optimizer(trainer: Trainer, lora_lr: float | None, scale_lr: float | None) -> None:
    """Make ``trainer.create_optimizer`` build its optimizer over :func:`optimizer_groups`.

    Overriding ``create_optimizer`` (on this trainer instance), not presetting ``trainer.optimizer``, is
    what also works under DeepSpeed: ``deepspeed_init`` drops a preset optimizer and calls
    ``create_optimizer``. The optimizer class and its other settings still come from ``args.optim``.
    """
    args = trainer.args
    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(args, trainer.model)
    if not isinstance(optimizer_cls, type) or {"params", "model", "optimizer_dict"} & set(kwargs):
        optim = getattr(args.optim, "value", args.optim)
        raise ValueError(
            f"TrainingArguments(optim={optim!r}) builds its own parameter groups, so the low-rank "
            "update and the scale gates cannot get their own lrs; use an AdamW/SGD-style optim (e.g. "
            "'adamw_torch')"
        )

    def create_optimizer(model: nn.Module | None = None) -> torch.optim.Optimizer:
        if trainer.optimizer is None:
            groups = optimizer_groups(
                model or trainer.model, args.learning_rate, lora_lr, args.weight_decay, scale_lr=scale_lr
            )
            trainer.optimizer = optimizer_cls(groups, **kwargs)
        return trainer.optimizer

    trainer.create_optimizer = create_optimizer


def attach(
    trainer: Trainer,
    adapter_name: str | None = None,
    *,
    log_metrics: bool = True,
    removable_multiple_of: int | None = 1,
    lora_lr: float | None = None,
    scale_lr: float | None = None,
) -> GateTrainerCallback:
    """Make a ``Trainer``/``SFTTrainer`` apply the sparsity objective; the one line after building it.

    Checks the set-up (:func:`check_trainer`), casts gate vectors back to fp32 if the trainer cast them
    (SFTTrainer does for 4/8-bit models; the optimizer is built later, in ``train()``), and inserts a
    :class:`GateTrainerCallback` first in ``trainer.callback_handler``. Calling it again replaces the
    previous callback. ``log_metrics=False`` skips the metrics (they cost a gather under ZeRO-3 on
    logging steps); ``removable_multiple_of`` is passed to :func:`gate_metrics`.

    An adapter with a low-rank update (``GateConfig.lora_rank > 0``) needs its own lr: pass
    ``lora_lr`` and, unless the trainer already has an optimizer, the trainer builds its ``args.optim``
    optimizer over :func:`optimizer_groups` (gates at ``args.learning_rate``, the update at ``lora_lr``;
    the Trainer's schedule then scales both). ``scale_lr`` likewise gives the scale gates
    (``GateConfig.scale_gates``) their own lr (see :func:`optimizer_groups`). Under DeepSpeed this
    needs a config without an ``"optimizer"`` section (ours have none), or DeepSpeed builds its own
    single-lr optimizer.

    Example:
        >>> trainer = SFTTrainer(model=model, args=args, train_dataset=ds, peft_config=GateConfig(...))
        >>> peft_gates.training.attach(trainer)
        >>> trainer.train()
    """
    if removable_multiple_of is not None and (
        not isinstance(removable_multiple_of, int) or removable_multiple_of < 1
    ):
        raise ValueError(
            f"attach(removable_multiple_of={removable_multiple_of!r}) is invalid: use an integer >= 1 (the "
            "width alignment of the logged removable share; 1 = none) or None to skip that metric"
        )
    for message in check_trainer(trainer, adapter_name):
        warnings.warn(message, stacklevel=2)
    gate_model = gate_model_of(trainer.model)
    rank = gate_model.peft_config[_adapter(gate_model, adapter_name)].lora_rank
    if lora_lr is not None and not rank:
        raise ValueError(
            f"attach(lora_lr={lora_lr}) but the adapter has no low-rank update (GateConfig.lora_rank=0); "
            "drop lora_lr, or set GateConfig.lora_rank > 0"
        )
    if trainer.optimizer is not None and (lora_lr is not None or scale_lr is not None):
        lrs = (("lora_lr", lora_lr), ("scale_lr", scale_lr))
        given = ", ".join(f"{name}={value}" for name, value in lrs if value is not None)
        warnings.warn(
            f"attach({given}) is not used: the trainer already has an optimizer, whose groups stay as they "
            "are; build it over peft_gates.training.optimizer_groups() to give those parameters their lr",
            stacklevel=2,
        )
    if trainer.optimizer is None and (rank or scale_lr is not None):
        if rank and lora_lr is None:
            raise ValueError(
                f"the adapter has a low-rank update (GateConfig.lora_rank={rank}), which must not train at "
                f"the gates' lr (learning_rate={trainer.args.learning_rate}); pass attach(trainer, "
                "lora_lr=2e-4) or give the trainer an optimizer over peft_gates.training.optimizer_groups()"
            )
        # refuses a scale_lr the model has no scale gates for before training starts, naming the fix
        optimizer_groups(trainer.model, trainer.args.learning_rate, lora_lr, scale_lr=scale_lr)
        _group_the_optimizer(trainer, lora_lr, scale_lr)
    recast = _recast_gates_fp32(gate_model, _adapter(gate_model, adapter_name))
    if recast:
        logger.info("peft_gates: cast %d gate vectors back to fp32 (the trainer had cast them)", recast)
    handler = trainer.callback_handler
    handler.callbacks = [cb for cb in handler.callbacks if not isinstance(cb, GateTrainerCallback)]
    callback = GateTrainerCallback(
        trainer, adapter_name, log_metrics=log_metrics, removable_multiple_of=removable_multiple_of
    )
    handler.callbacks.insert(0, callback)
    return callback


__all__ = [
    "METRIC_KEYS",
    "GateTrainerCallback",
    "attach",
    "check_trainer",
    "current_loss_scale",
    "find_gate_model",
    "gate_metrics",
    "gate_model_of",
    "optimizer_groups",
    "set_sparsity_step",
]
