"""DeepSpeed ZeRO x2 on CPU: ``torchrun --nproc_per_node 2 ds_train.py OUT.json STAGE [FLAG ...]``.

Trains the tiny gated Llama (global batch 4) with the shipped integrations/deepspeed/zero{STAGE}.json
(fp32, a torch optimizer: DeepSpeed's own CPU optimizers JIT-compile ops) and writes curves and final
gates to OUT.json. One configuration per process: DeepSpeed keeps global state.

Flags: ``gc`` / ``gc_reentrant`` (gradient checkpointing), ``ga2`` (per-device batch 1 x 2 accumulation
steps), ``pretrained=DIR`` (load the base with from_pretrained after the training arguments exist, so
ZeRO-3 partitions it at load time through zero.Init, as TRL scripts do), ``bf16``, ``fp16``, ``lora``
(a rank-4 update inside the gates, at its own lr: ``g.LOW_RANK_LRS``), ``global`` (unit gates under one
shared sparsity budget: ``g.GLOBAL_SCOPE``).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gate_setups as g  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    out_json, stage, flags = sys.argv[1], sys.argv[2], set(sys.argv[3:])
    pretrained = next((f.split("=", 1)[1] for f in flags if f.startswith("pretrained=")), None)
    g.setup_deepspeed_on_cpu()
    from transformers import Trainer

    from peft_gates.training import attach, current_loss_scale

    extra: dict = {}
    if "gc" in flags or "gc_reentrant" in flags:
        extra = dict(
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": "gc_reentrant" in flags},
        )
    per_device, ga = (1, 2) if "ga2" in flags else (2, 1)
    gates_kw = {"lora_rank": 4} if "lora" in flags else {}
    if gates_kw:
        extra["learning_rate"] = g.LOW_RANK_LRS[0]
    if "global" in flags:
        gates_kw.update(g.GLOBAL_SCOPE)
    try:
        args = g.training_args(
            str(Path(out_json).parent / f"ds{stage}"),
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=ga,
            deepspeed=str(g.INTEGRATIONS / "deepspeed" / f"zero{stage}.json"),
            accelerator_config={"use_configured_state": True},
            bf16="bf16" in flags,
            fp16="fp16" in flags,
            **extra,
        )
        if pretrained:
            from peft import get_peft_model
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32)
            zero_init = any(hasattr(p, "ds_id") for p in base.parameters())
            torch.manual_seed(100)  # the gate init draws of g.gated_model()
            model = get_peft_model(base, g.gate_config(**gates_kw))
        else:
            zero_init = False
            model = g.gated_model(**gates_kw)
        trainer = Trainer(model=model, args=args, train_dataset=g.RowsDataset(g.token_rows()))
        attach(trainer, lora_lr=g.LOW_RANK_LRS[1] if gates_kw.get("lora_rank") else None)
        trainer.train()
        engine = trainer.model_wrapped
        partitioned = sum(
            1 for n, p in trainer.model.named_parameters() if "peft_gates_" in n and p.numel() == 0
        )
        result = {
            "curves": g.curves(trainer),
            "gates": g.gate_vectors(trainer.model),
            "engine": type(engine).__name__,
            "zero_stage": engine.zero_optimization_stage(),
            "world_size": trainer.accelerator.num_processes,
            "loss_scale": current_loss_scale(trainer.accelerator, engine),
            "partitioned_gate_vectors": partitioned,
            "zero_init_base": zero_init,
        }
    except Exception:
        result = {"error": traceback.format_exc()[-3000:]}
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out_json).write_text(json.dumps(result))
    g.shutdown_distributed()


if __name__ == "__main__":
    main()
