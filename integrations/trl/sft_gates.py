"""Supervised finetuning with FineGates gates under TRL's SFTTrainer, then the pruning merge.

TRL-style command line (``TrlParser``: ScriptArguments, SFTConfig, ModelConfig, and GateArguments for
the ``GateConfig`` fields); accepts ``--config recipe.yaml`` like the TRL scripts. Trains the gates,
saves the adapter to ``--output_dir``, then (main process, after training) reloads base + adapter in a
plain fp32 process-local copy, folds the gates and cuts closed units out, and saves the smaller model
to ``--pruned_output_dir`` (default ``OUTPUT_DIR/pruned``).

Single process (CPU works with a local model directory and a local data set; nothing is downloaded
when both are local):

    python integrations/trl/sft_gates.py --model_name_or_path ./my-llama --dataset_name ./data \\
        --output_dir out --max_steps 200 --learning_rate 1e-2 --bf16 False --use_cpu True

Multi-GPU (see integrations/README.md): ``accelerate launch --config_file
integrations/accelerate/zero3.yaml integrations/trl/sft_gates.py ...``.

``--dataset_name`` takes a hub name, a local directory of data files (json/jsonl/csv/parquet), a single
data file, or a directory written by ``datasets.save_to_disk``; rows need a ``text`` column or TRL's
conversational / prompt-completion columns.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

import peft_gates
from peft_gates.training import attach

logger = logging.getLogger("sft_gates")

_DATA_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}


@dataclass
class GateArguments:
    """Command-line mirror of :class:`peft_gates.GateConfig` (same names and defaults), plus the merge.

    ``gate_target_modules`` / ``gate_exclude_modules`` / ``gate_modules_to_save`` / ``gate_bias`` /
    ``gate_lora_rank`` / ``gate_lora_alpha`` are prefixed so they do not clash with ModelConfig's LoRA
    options; ``column_group_size`` takes an integer or a JSON mapping (``'{"o_proj": 64}'``).
    ``gate_lora_lr`` is the low-rank update's own lr (the gates train at ``--learning_rate``), and
    ``gate_scale_lr`` the scale gates' own lr (default: ``--learning_rate``).
    """

    gate_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules to gate (suffixes, or 'all-linear'); default: every Linear but lm_head."},
    )
    gate_exclude_modules: list[str] | None = field(default=None, metadata={"help": "Modules never to gate."})
    gate_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained in full and saved."}
    )
    placement: str = field(default="both", metadata={"help": "rows | columns | both | units."})
    scale_gates: str = field(
        default="none",
        metadata={"help": "units only: scale gates outside the sparsity term (none|rows|columns|both)."},
    )
    column_group_size: str = field(default="1", metadata={"help": "int, or JSON {module-suffix: size}."})
    target_sparsity: float = field(default=0.3, metadata={"help": "Fraction of gates to close."})
    sparsity_weight: float = field(default=50.0, metadata={"help": "lambda of the sparsity term."})
    sparsity_scope: str = field(
        default="layer",
        metadata={"help": "layer: a target per layer (the paper's) | global: one parameter budget for all."},
    )
    init_mean: float = field(default=1.0, metadata={"help": "Mean of the raw gate init."})
    init_std: float = field(default=0.1, metadata={"help": "Std of the raw gate init."})
    noise_std: float = field(default=0.1, metadata={"help": "Std of the training noise."})
    sigma: float = field(default=0.5, metadata={"help": "Scale of the open probability."})
    sparsity_start_step: int = field(default=0, metadata={"help": "Optimizer steps before the term starts."})
    sparsity_warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up of lambda (steps)."})
    recovery_start_step: int = field(
        default=0,
        metadata={"help": "Step from which the gates train as the pruned model (0: never)."},
    )
    gate_bias: str = field(default="none", metadata={"help": "none | all | peft_gates_only."})
    gate_lora_rank: int = field(
        default=0,
        metadata={"help": "Rank of a low-rank update inside the gates (0: gates only, the paper's)."},
    )
    gate_lora_alpha: float = field(
        default=16.0, metadata={"help": "alpha of that update (scale alpha / rank)."}
    )
    gate_lora_lr: float | None = field(
        default=None, metadata={"help": "lr of that update (needed with --gate_lora_rank > 0), e.g. 2e-4."}
    )
    gate_scale_lr: float | None = field(
        default=None,
        metadata={"help": "lr of the scale gates (default: --learning_rate); needs --scale_gates."},
    )
    prune: bool = field(
        default=True, metadata={"help": "After training, fold the gates and prune the model."}
    )
    pruned_output_dir: str | None = field(default=None, metadata={"help": "Default: OUTPUT_DIR/pruned."})
    prune_multiple_of: int = field(
        default=128,
        metadata={"help": "Round kept MLP widths up to this multiple (hardware-friendly shapes)."},
    )

    # GateArguments field -> GateConfig field, where the names differ.
    RENAMED = {
        "gate_target_modules": "target_modules",
        "gate_exclude_modules": "exclude_modules",
        "gate_modules_to_save": "modules_to_save",
        "gate_bias": "bias",
        "gate_lora_rank": "lora_rank",
        "gate_lora_alpha": "lora_alpha",
    }
    #: fields that are not GateConfig fields: the optimizer's and the merge's
    NOT_CONFIG = ("gate_lora_lr", "gate_scale_lr", "prune", "pruned_output_dir", "prune_multiple_of")

    def to_config(self) -> peft_gates.GateConfig:
        """The GateConfig these arguments describe."""
        kwargs: dict[str, Any] = {}
        for f in fields(self):
            if f.name in self.NOT_CONFIG:
                continue
            kwargs[self.RENAMED.get(f.name, f.name)] = getattr(self, f.name)
        kwargs["column_group_size"] = _group_size(kwargs["column_group_size"])
        if kwargs["target_modules"] == ["all-linear"]:
            kwargs["target_modules"] = "all-linear"
        return peft_gates.GateConfig(task_type="CAUSAL_LM", **kwargs)


def _group_size(text: str) -> int | dict[str, int]:
    """``--column_group_size``: an integer or a JSON object of module-name suffix -> size."""
    try:
        return json.loads(text) if text.strip().startswith("{") else int(text)
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(
            f"--column_group_size {text!r} is invalid ({err}): give an integer (e.g. 64) or a JSON object "
            "with quoted keys (e.g. '{\"o_proj\": 64}')"
        ) from None


def load_train_eval(script_args: Any, training_args: Any) -> tuple[Any, Any]:
    """Train (and eval) splits from a hub name, a local data dir/file, or a ``save_to_disk`` dir."""
    import datasets

    name = script_args.dataset_name
    if not name:
        raise ValueError(
            "--dataset_name is required (a hub name, a local data dir or file, or a save_to_disk dir)"
        )
    path = Path(name)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        data = datasets.load_from_disk(str(path))
    elif path.is_file():
        builder = _DATA_FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(
                f"--dataset_name {name}: unknown data file type {path.suffix!r}; use one of "
                f"{sorted(_DATA_FILE_BUILDERS)} (or a directory written by Dataset.save_to_disk)"
            )
        data = datasets.load_dataset(builder, data_files=str(path))
    else:  # a local directory of data files, or a hub name
        data = datasets.load_dataset(name, name=script_args.dataset_config)
    if isinstance(data, datasets.Dataset):
        data = datasets.DatasetDict({script_args.dataset_train_split: data})
    wanted = {"--dataset_train_split": script_args.dataset_train_split}
    if training_args.eval_strategy != "no":
        wanted["--dataset_test_split"] = script_args.dataset_test_split
    for flag, split in wanted.items():
        if split not in data:
            raise ValueError(
                f"--dataset_name {name} has no split {split!r} (it has {sorted(data)}): pass {flag} with one "
                "of those" + (" or --eval_strategy no" if flag == "--dataset_test_split" else "")
            )
    evaluation = data[wanted["--dataset_test_split"]] if "--dataset_test_split" in wanted else None
    return data[script_args.dataset_train_split], evaluation


def prune_saved_adapter(
    model_args: Any, adapter_dir: str, out_dir: str, tokenizer: Any, multiple_of: int
) -> Path:
    """Reload base + gate adapter (fp32, this process only), fold and prune, save the smaller model.

    Works the same after single-process, DDP and ZeRO runs: PEFT's merge is not ZeRO-3 aware, so the
    merge never touches the training model; ZeRO-3's load-time partitioning is switched off first.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    if is_deepspeed_zero3_enabled():
        unset_hf_deepspeed_config()
    base = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=torch.float32,
        device_map="cpu",
    )
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    plan = peft_gates.plan_pruning(peft_model, multiple_of=multiple_of)
    pruned = peft_model.merge_and_unload(multiple_of=multiple_of)  # GateModel's merge is the pruning merge
    saved = peft_gates.save_pruned(pruned, out_dir, tokenizer=tokenizer, overwrite=True, report=plan)
    logger.info(
        "pruned model saved to %s: %d of %d parameters removed",
        saved,
        plan.params_removed,
        plan.params_total_before,
    )
    return Path(saved)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default ``sys.argv``), train, save, prune; return paths and final metrics."""
    from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser, get_quantization_config

    if (
        not torch.cuda.is_available()
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
        and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    ):
        # CPU DeepSpeed (a test set-up): accelerate 1.15 counts one process unless the gloo state is
        # built first; pass --accelerator_config '{"use_configured_state": true}' to use it.
        from accelerate import PartialState

        PartialState(backend="gloo")
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, GateArguments))
    script_args, training_args, model_args, gate_args = parser.parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    if model_args.use_peft:
        raise ValueError(
            "--use_peft configures LoRA; this script trains gates (see the GateArguments options)"
        )
    if gate_args.gate_lora_rank and gate_args.gate_lora_lr is None:
        raise ValueError(
            f"--gate_lora_rank {gate_args.gate_lora_rank} needs --gate_lora_lr, the update's own lr (e.g. "
            f"2e-4); the gates train at --learning_rate ({training_args.learning_rate}), which would wreck it"
        )
    if gate_args.gate_scale_lr is not None and gate_args.scale_gates == "none":
        raise ValueError(
            f"--gate_scale_lr {gate_args.gate_scale_lr} needs scale gates: add --placement units "
            "--scale_gates rows|columns|both, or drop --gate_scale_lr"
        )

    # transformers turns find_unused_parameters on for a PeftModel; every gate is used in every step,
    # and with reentrant checkpointing DDP would fail, so default it off (attach() checks it).
    if training_args.gradient_checkpointing and training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = False

    quantization_config = get_quantization_config(model_args)
    model_init_kwargs = dict(training_args.model_init_kwargs or {})
    model_init_kwargs.setdefault("revision", model_args.model_revision)
    model_init_kwargs.setdefault("attn_implementation", model_args.attn_implementation)
    model_init_kwargs.setdefault("dtype", model_args.dtype)
    training_args.model_init_kwargs = model_init_kwargs

    train_dataset, eval_dataset = load_train_eval(script_args, training_args)
    trainer = SFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=quantization_config,
        peft_config=gate_args.to_config(),
    )
    if quantization_config is not None:
        # bitsandbytes on CPUs with avx512_bf16: a first eval-mode forward without gradients repacks 4-bit
        # weights into a layout without autograd; prepare_quantized_for_gates switches that off.
        peft_gates.quantization.prepare_quantized_for_gates(trainer.model)
    attach(trainer, lora_lr=gate_args.gate_lora_lr, scale_lr=gate_args.gate_scale_lr)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: log_history with the gate metrics of every logging step
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    result: dict[str, Any] = {
        "adapter_dir": training_args.output_dir,
        "final_log": train_logs[-1] if train_logs else {},
    }

    trainer.accelerator.wait_for_everyone()
    if gate_args.prune and trainer.accelerator.is_main_process:
        out_dir = gate_args.pruned_output_dir or os.path.join(training_args.output_dir, "pruned")
        result["pruned_dir"] = str(
            prune_saved_adapter(
                model_args,
                training_args.output_dir,
                out_dir,
                trainer.processing_class,
                gate_args.prune_multiple_of,
            )
        )
    trainer.accelerator.wait_for_everyone()
    return result


if __name__ == "__main__":
    main()
