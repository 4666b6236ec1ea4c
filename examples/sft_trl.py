"""TRL SFT with gates: ``SFTTrainer(peft_config=GateConfig(...))``, accuracy before/after, the pruning merge.

SFTTrainer builds the PeftModel itself from ``peft_config`` (as with LoRA); ``peft_gates.attach(trainer)``
adds the sparsity schedule and logs ``sparsity_loss``, ``sparsity_lambda``, ``sparsity_realized``,
``gates_fractional`` and ``params_removable`` next to the loss. The task is prompt/completion
conversations, so SFTTrainer computes the loss on the answer tokens only. The pruned model scores the same
as the gated one: the merge is exact.

    python examples/sft_trl.py                  # SmolLM2-135M-Instruct, Rotten Tomatoes sentiment
    python examples/sft_trl.py --steps 300 --multiple-of 64 --out sft-gates
    python examples/sft_trl.py --smoke          # tiny random model, a few steps, temporary directory

For multi-GPU, DeepSpeed and a full TRL command line (``--config recipe.yaml``), use
integrations/trl/sft_gates.py (docs/guides/trl.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import peft_gates
from peft_gates import assets


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny random model, a few steps, temp dir")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps")
    parser.add_argument("--train-size", type=int, default=1200, help="training sentences")
    parser.add_argument("--test-size", type=int, default=400, help="held-out sentences scored")
    parser.add_argument("--target-sparsity", type=float, default=0.3)
    parser.add_argument("--multiple-of", type=int, default=128, help="round kept MLP widths to this")
    parser.add_argument("--out", default="sft-gates", help="output directory")
    args = parser.parse_args()

    if args.smoke:
        import _smoke

        _smoke.enter_smoke_mode()
        tokenizer = _smoke.tiny_tokenizer()
        model = _smoke.tiny_causal_lm(tokenizer)
        train, test = _smoke.synthetic_sentiment(32), _smoke.synthetic_sentiment(16, seed=1)
        args.steps = 4
    else:
        model, tokenizer = assets.load_smollm2()
        train, test = assets.load_movie_sentences()
        train, test = train[: args.train_size], test[: args.test_size]
    out = Path(args.out)

    print(f"zero-shot accuracy: {assets.lm_accuracy(model, tokenizer, test):.1%}")
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(out / "run"),
            max_steps=args.steps,
            per_device_train_batch_size=8,
            learning_rate=2e-2,
            lr_scheduler_type="constant",
            max_length=128,
            logging_steps=max(1, args.steps // 10),
            save_strategy="no",
            report_to="none",
            gradient_checkpointing=False,
            bf16=torch.cuda.is_available(),
            use_cpu=not torch.cuda.is_available(),
        ),
        train_dataset=Dataset.from_list(assets.build_sft_examples(tokenizer, train)),
        processing_class=tokenizer,
        peft_config=peft_gates.GateConfig(
            task_type="CAUSAL_LM", placement="units", target_sparsity=args.target_sparsity
        ),
    )
    peft_gates.attach(trainer)
    trainer.train()
    last = [entry for entry in trainer.state.log_history if "sparsity_loss" in entry][-1]
    print(
        "last logged gate metrics:",
        {k: v for k, v in last.items() if k.startswith(("sparsity", "gates", "params"))},
    )

    gated = trainer.model
    trainer.save_model(str(out / "adapter"))  # the adapter: gates only, a few KB
    print(peft_gates.gate_statistics(gated, multiple_of=args.multiple_of).summary())
    print(f"gated accuracy: {assets.lm_accuracy(gated, tokenizer, test):.1%}")

    plan = peft_gates.plan_pruning(gated, multiple_of=args.multiple_of)
    pruned = gated.merge_and_unload(multiple_of=args.multiple_of)
    print(f"pruned accuracy: {assets.lm_accuracy(pruned, tokenizer, test):.1%}")
    saved = peft_gates.save_pruned(pruned, out / "pruned", tokenizer=tokenizer, report=plan, overwrite=True)
    print(
        f"{plan.params_total_before:,} -> {plan.params_total_after:,} parameters; "
        f"model and compression_report.md in {saved}"
    )


if __name__ == "__main__":
    main()
