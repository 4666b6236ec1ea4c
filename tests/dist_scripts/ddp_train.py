"""DDP x2 on CPU (gloo): ``torchrun --nproc_per_node 2 ddp_train.py OUT.json SETUP [SETUP ...]``.

Each SETUP trains the tiny gated Llama from scratch with per-device batch 2 (global batch 4, as the
single-process reference with batch 4) and writes its curves and final gates under OUT.json[SETUP].
Setups: plain, gc (non-reentrant checkpointing), gc_reentrant, noise (gate noise on),
unused_reentrant / unused_nonreentrant (ddp_find_unused_parameters=True with checkpointing, run
WITHOUT attach's check, to record whether DDP accepts it).
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

SETUPS = {
    "plain": dict(args={}, gates={}),
    "gc": dict(
        args=dict(
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            ddp_find_unused_parameters=False,
        ),
        gates={},
    ),
    "gc_reentrant": dict(
        args=dict(
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": True},
            ddp_find_unused_parameters=False,
        ),
        gates={},
    ),
    "noise": dict(args={}, gates=dict(noise_std=0.1)),
    "unused_reentrant": dict(
        args=dict(
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": True},
            ddp_find_unused_parameters=True,
            max_steps=2,
        ),
        gates={},
        unchecked=True,
    ),
    "unused_nonreentrant": dict(
        args=dict(
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            ddp_find_unused_parameters=True,
            max_steps=2,
        ),
        gates={},
        unchecked=True,
    ),
}


def run_setup(name: str, out_dir: str) -> dict:
    from transformers import Trainer

    from peft_gates.training import GateTrainerCallback, attach, check_trainer

    spec = SETUPS[name]
    model = g.gated_model(**spec["gates"])
    args = g.training_args(out_dir, per_device_train_batch_size=2, **spec["args"])
    trainer = Trainer(model=model, args=args, train_dataset=g.RowsDataset(g.token_rows()))
    if spec.get("unchecked"):
        # What attach() says about this set-up, then what DDP does with it when the check is bypassed.
        try:
            check = {"warnings": check_trainer(trainer), "refused": None}
        except ValueError as err:
            check = {"warnings": [], "refused": str(err)}
        trainer.callback_handler.callbacks.insert(0, GateTrainerCallback(trainer))
        try:
            trainer.train()
        except Exception as err:  # recorded, not raised: the test asserts on it
            return {"check": check, "error": f"{type(err).__name__}: {err}"[:500]}
        return {"check": check, "error": None, "curves": g.curves(trainer)}
    attach(trainer)
    trainer.train()
    return {
        "curves": g.curves(trainer),
        "gates": g.gate_vectors(trainer.model),
        "world_size": trainer.accelerator.num_processes,
        "wrapper": type(trainer.model_wrapped).__name__,
    }


def main() -> None:
    torch.set_num_threads(1)
    out_json, names = sys.argv[1], sys.argv[2:]
    results = {}
    for name in names:
        try:
            results[name] = run_setup(name, str(Path(out_json).parent / f"ddp_{name}"))
        except Exception:
            results[name] = {"error": traceback.format_exc()[-2000:]}
            break
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out_json).write_text(json.dumps(results))
    g.shutdown_distributed()


if __name__ == "__main__":
    main()
