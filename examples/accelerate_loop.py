"""A plain accelerate training loop with gates: the one call a hand-written loop needs.

The sparsity gradient is injected in the backward pass of the gate layers, so the loop back-propagates the
task loss only. Once per optimizer step, before its first micro-batch, it calls
``peft_gates.set_sparsity_step(model, step, accelerator)``: lambda from the GateConfig schedule,
and the injected gradient scaled like ``accelerator.backward`` scales the loss (1 / gradient accumulation
steps, times the fp16 loss scale). Runs unchanged under ``accelerate launch`` (DDP, DeepSpeed).

The loop itself is ``train`` of ``integrations/accelerate/train_loop.py``, imported from there so that it
is written once; this example adds the task (chat prompts, loss on the answer tokens only), ``--smoke``,
and the merge and save on the main process.

    python examples/accelerate_loop.py                       # SmolLM2-135M-Instruct, sentiment answers
    accelerate launch --config_file integrations/accelerate/ddp.yaml examples/accelerate_loop.py
    python examples/accelerate_loop.py --smoke               # tiny random model, a few steps
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import get_peft_model

import peft_gates
from peft_gates import assets

INTEGRATION_DIR = Path(__file__).resolve().parents[1] / "integrations" / "accelerate"


def encode(tokenizer, pairs: list[tuple[str, int]]) -> list[dict[str, list[int]]]:
    """Chat prompt + answer word; the loss covers the answer tokens only (labels -100 on the prompt)."""
    rows = []
    for sentence, label in pairs:
        prompt = tokenizer(assets.sentiment_prompt(tokenizer, sentence), add_special_tokens=False)[
            "input_ids"
        ]
        answer = tokenizer(assets.ANSWER_WORDS[label] + tokenizer.eos_token, add_special_tokens=False)[
            "input_ids"
        ]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return rows


def collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": [], "labels": [], "attention_mask": []}
    for r in rows:
        pad = width - len(r["input_ids"])
        batch["input_ids"].append(r["input_ids"] + [pad_id] * pad)
        batch["labels"].append(r["labels"] + [-100] * pad)
        batch["attention_mask"].append([1] * len(r["input_ids"]) + [0] * pad)
    return {k: torch.tensor(v) for k, v in batch.items()}


def main() -> None:
    sys.path.insert(0, str(INTEGRATION_DIR))
    from train_loop import positive_int, train

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny random model, a few steps, temp dir")
    parser.add_argument("--steps", type=positive_int, default=150, help="optimizer steps")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    parser.add_argument("--train-size", type=positive_int, default=1200)
    parser.add_argument("--out", default="gates-accelerate", help="output directory")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # train() logs its metrics every 10 steps

    if args.smoke:
        import _smoke

        _smoke.enter_smoke_mode()
        tokenizer = _smoke.tiny_tokenizer()
        model = _smoke.tiny_causal_lm(tokenizer)
        pairs = _smoke.synthetic_sentiment(32)
        args.steps, args.gradient_accumulation_steps = 3, 2
    else:
        model, tokenizer = assets.load_smollm2()
        pairs = assets.load_movie_sentences()[0][: args.train_size]

    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)
    model = get_peft_model(model, peft_gates.GateConfig(task_type="CAUSAL_LM", placement="units"))
    loader = torch.utils.data.DataLoader(
        encode(tokenizer, pairs),
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=lambda rows: collate(rows, tokenizer.pad_token_id),
    )
    optimizer = torch.optim.AdamW(peft_gates.training.optimizer_groups(model, lr=2e-2))  # gates: no decay
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    history = train(model, loader, optimizer, accelerator, args.steps, log_every=10)
    accelerator.print(f"step {history[-1]['step']}: loss {history[-1]['loss']:.3f}")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        gated = accelerator.unwrap_model(model)
        print(peft_gates.gate_statistics(gated).summary())
        out = Path(args.out)
        gated.save_pretrained(out / "adapter")
        pruned = gated.merge_and_unload()
        saved = peft_gates.save_pruned(pruned, out / "pruned", tokenizer=tokenizer, overwrite=True)
        print(f"pruned model: {sum(p.numel() for p in pruned.parameters()):,} parameters in {saved}")


if __name__ == "__main__":
    main()
