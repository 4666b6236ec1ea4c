"""A hand-written accelerate loop with FineGates gates: the one call a custom loop needs.

The sparsity gradient is injected inside the backward pass of the gate layers, so the loop computes
and back-propagates the task loss only. Once per optimizer step, before its first micro-batch, it
calls ``peft_gates.training.set_sparsity_step(model, step, accelerator)``: that sets lambda from the
GateConfig schedule and scales the injected gradient like ``accelerator.backward`` scales the loss
(``1 / gradient_accumulation_steps``, times the fp16 loss scale of a GradScaler or DeepSpeed).
Without accelerate, call ``model.base_model.set_sparsity_step(step, gradient_accumulation_steps=...,
loss_scale=...)`` on the PeftModel yourself.

Runs as is on CPU with a tiny random Llama (no downloads), or on a local model directory:

    python integrations/accelerate/train_loop.py --steps 20
    accelerate launch --config_file integrations/accelerate/ddp.yaml integrations/accelerate/train_loop.py
    python integrations/accelerate/train_loop.py --model_path ./my-local-llama --steps 200

``examples/accelerate_loop.py`` imports :func:`train` from here and runs it on SmolLM2-135M-Instruct and the
sentiment task, then merges and saves on the main process.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterable

import torch
from accelerate import Accelerator, PartialState
from peft import get_peft_model
from torch import nn

import peft_gates
from peft_gates.cli import positive_int
from peft_gates.training import gate_metrics, optimizer_groups, set_sparsity_step

logger = logging.getLogger(__name__)


def train(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    max_steps: int,
    log_every: int = 0,
) -> list[dict[str, float]]:
    """Train a prepared gated model for ``max_steps`` optimizer steps; return per-step metrics.

    ``model``, ``optimizer`` and the dataloader behind ``batches`` must come from
    ``accelerator.prepare``; gradient accumulation follows ``accelerator.gradient_accumulation_steps``.
    """
    history: list[dict[str, float]] = []
    step, window = 0, []
    starts_step = True  # the next micro-batch opens an optimizer step
    model.train()
    while step < max_steps:
        empty = True
        for batch in batches:
            empty = False
            if starts_step:
                # lambda from the schedule, gradient scale for GA / fp16. Not `micro % GA == 0`: accelerate
                # also steps at the end of every pass over the loader, so the next step starts right after.
                set_sparsity_step(model, step, accelerator)
                starts_step = False
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            window.append(loss.detach().float().item())
            if accelerator.sync_gradients:
                loss_avg = accelerator.reduce(
                    torch.tensor(sum(window) / len(window), device=accelerator.device), "mean"
                ).item()
                record = {"step": step + 1, "loss": loss_avg, **gate_metrics(model)}
                history.append(record)
                if log_every and (step + 1) % log_every == 0 and accelerator.is_main_process:
                    logger.info("%s", record)
                step, window, starts_step = step + 1, [], True
                if step >= max_steps:
                    break
        if empty:
            raise ValueError("the dataloader yielded no batch: give it training data (it has length 0)")
    return history


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_path", default=None, help="local model dir; default: a tiny random Llama")
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--batch_size", type=positive_int, default=4)
    parser.add_argument("--seq_len", type=positive_int, default=16)
    parser.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--sparsity_weight", type=float, default=50.0)
    parser.add_argument("--target_sparsity", type=float, default=0.3)
    parser.add_argument("--placement", default="both")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # CPU multi-process (gloo): accelerate 1.15 under DeepSpeed counts one process unless the
        # distributed state exists before the Accelerator is built.
        PartialState(backend="gloo")
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)
    torch.manual_seed(0)
    if args.model_path:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    else:
        base = _tiny_llama()
    config = peft_gates.GateConfig(
        placement=args.placement,
        sparsity_weight=args.sparsity_weight,
        target_sparsity=args.target_sparsity,
    )
    model = get_peft_model(base, config)
    vocab = base.config.vocab_size
    ids = torch.randint(
        0, vocab, (args.batch_size * 16, args.seq_len), generator=torch.Generator().manual_seed(0)
    )
    data = [{"input_ids": row, "labels": row} for row in ids]
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True)
    optimizer = torch.optim.AdamW(optimizer_groups(model, lr=args.lr))  # gates: no weight decay
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    train(model, loader, optimizer, accelerator, args.steps, log_every=1)


if __name__ == "__main__":
    main()
