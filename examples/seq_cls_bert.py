"""Sequence classification with gates on a BERT encoder (all-MiniLM-L6-v2), transformers ``Trainer``.

``GateConfig(task_type="SEQ_CLS")`` makes PEFT train and save the new classifier head in full
(``modules_to_save``) next to the gates. Gates and head get different learning rates (gates must move far,
the head must not), through an optimizer handed to the Trainer. After the merge the model is saved in the
``zero_pad`` layout: a stock BERT config that plain transformers loads without ``peft_gates``.

    python examples/seq_cls_bert.py              # MiniLM-L6 on Rotten Tomatoes sentiment
    python examples/seq_cls_bert.py --epochs 3 --out cls-gates
    python examples/seq_cls_bert.py --smoke      # tiny random BERT, a few steps, temporary directory
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import peft_gates
from peft_gates import assets

BATCH_SIZE = 32
SPARSITY_START = 20  # optimizer steps before the sparsity term starts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny random BERT, a few steps, temp dir")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--train-size", type=int, default=2048, help="training sentences")
    parser.add_argument("--test-size", type=int, default=500, help="held-out sentences scored")
    parser.add_argument("--target-sparsity", type=float, default=0.3)
    parser.add_argument("--out", default="cls-gates", help="output directory")
    args = parser.parse_args()
    steps = math.ceil(args.train_size / BATCH_SIZE) * args.epochs
    if not args.smoke and steps <= SPARSITY_START:
        parser.error(
            f"--train-size {args.train_size} x --epochs {args.epochs} is {steps:g} steps of batch "
            f"{BATCH_SIZE}, not more than the {SPARSITY_START} before the sparsity term starts, so no gate "
            "would close; "
            "train on more sentences or for more epochs"
        )

    if args.smoke:
        import _smoke

        _smoke.enter_smoke_mode()
        tokenizer = _smoke.tiny_tokenizer()
        model = _smoke.tiny_classifier(tokenizer)
        train, test = _smoke.synthetic_sentiment(64), _smoke.synthetic_sentiment(16, seed=1)
        args.epochs = 1.0
    else:
        model, tokenizer = assets.load_minilm_classifier(num_labels=2)  # new, untrained head
        train, test = assets.load_movie_sentences()
        train, test = train[: args.train_size], test[: args.test_size]
    out = Path(args.out)

    config = peft_gates.GateConfig(
        task_type="SEQ_CLS",  # also trains and saves the classifier head (modules_to_save)
        placement="units",
        target_sparsity=args.target_sparsity,
        init_mean=0.6,  # paper: 1.0, where every noisy sample clamps to 1 and no task gradient flows
        sparsity_start_step=SPARSITY_START,  # let the head learn before the sparsity term starts
        sparsity_warmup_steps=20,
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    def encode(pairs: list[tuple[str, int]]) -> Dataset:
        data = Dataset.from_dict({"text": [s for s, _ in pairs], "label": [y for _, y in pairs]})
        return data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True)

    # gates at 1e-2 and without weight decay (decay pulls every gate towards half-open), the head at 1e-3
    optimizer = torch.optim.AdamW(peft_gates.training.optimizer_groups(model, lr=1e-2, other_lr=1e-3))
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out / "run"),
            num_train_epochs=args.epochs,
            per_device_train_batch_size=BATCH_SIZE,
            logging_steps=20,
            save_strategy="no",
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            lr_scheduler_type="constant",
        ),
        train_dataset=encode(train).remove_columns("text"),
        data_collator=DataCollatorWithPadding(tokenizer),
        optimizers=(optimizer, None),  # the scheduler follows lr_scheduler_type: constant
    )
    peft_gates.attach(trainer)
    trainer.train()
    print(peft_gates.gate_statistics(model).summary())
    print(f"gated accuracy: {assets.cls_accuracy(model, tokenizer, test):.1%}")

    plan = peft_gates.plan_pruning(model)
    pruned = model.merge_and_unload()
    saved = peft_gates.save_pruned(
        pruned, out / "pruned", tokenizer=tokenizer, layout="zero_pad", report=plan, overwrite=True
    )
    stock = AutoModelForSequenceClassification.from_pretrained(saved)  # a stock BertForSequenceClassification
    print(f"pruned accuracy (stock reload): {assets.cls_accuracy(stock, tokenizer, test):.1%}")
    print(
        f"{plan.params_total_before:,} parameters -> {plan.params_total_after:,} with per-layer widths, "
        f"{sum(p.numel() for p in stock.parameters()):,} zero-padded to the widest block; report in {saved}"
    )


if __name__ == "__main__":
    main()
