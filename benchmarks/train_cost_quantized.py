"""Training cost on a bitsandbytes 4-bit base: gates vs QLoRA (LoRA r=16), same model, batch and length.

One invocation measures every method, each in a fresh subprocess (same checkpoint, same quantization, same
seed and token batch), alternating the order over ``--rounds``, and reports ratios against ``--baseline``
(``qlora16``: LoRA r=16, alpha 32, on every block Linear of the same 4-bit base). A step is forward +
backward + AdamW step (+ setting lambda for gates, as the Trainer callback does). Both methods get the same
base preparation (:func:`peft_gates.quantization.prepare_quantized_for_gates`, which only switches off
bitsandbytes' CPU repacking); neither gets ``peft.prepare_model_for_kbit_training`` (its fp32 upcast of the
embeddings/norms would add the same memory to both and hide the difference).

What "memory" is:

* CUDA: ``torch.cuda.max_memory_allocated`` over the timed steps, reset after loading and warm-up, so it is
  the 4-bit weights + activations + gradients + optimizer state of one step (tensors only).
* CPU: torch has no CPU allocation counter, and ``tracemalloc`` only sees Python's own allocator, not
  torch's tensors (it reports ~0 for a training step). We report process RSS instead: ``RSS increment`` is
  the highest RSS sampled every 2 ms during the timed steps minus the RSS just before them (activations,
  gradients, optimizer state, bitsandbytes' dequantized weight temporaries: the part that differs between
  methods), plus the peak itself. RSS counts pages the allocator holds, not live tensors: compare
  increments between methods of one run, not bytes across machines.

Defaults are a small CPU setting (2-layer random Llama, nf4 + double quant, batch 2 x 64, 5 timed steps
after 2 warm-up, one thread). ``--size 135m`` uses SmolLM2-135M-Instruct's real weights (saved to a temp
checkpoint as fp32, then loaded in 4 bit); on a GPU use ``--device cuda --size 1b --batch-size 8 --seq-len
512 --grad-ckpt`` for the setting of docs' H100 table (bf16 compute and storage of the non-4-bit parts).
Writes ``<out>/<name>.json`` (default ``benchmarks/results/train_cost_quantized.json``).

The options, the training step, the step timing, the worker command line and the round/ratio bookkeeping
are ``train_cost.py``'s; this file adds the 4-bit loading and its own report.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

try:  # `python -m benchmarks.train_cost_quantized`
    from benchmarks import common, train_cost
except ImportError:  # `python benchmarks/train_cost_quantized.py`
    import common  # type: ignore[no-redef]
    import train_cost  # type: ignore[no-redef]

METHODS = ("qlora16", "gates-both", "gates-units", "gates-rows")
DEFAULT_METHODS = ("qlora16", "gates-both", "gates-units")
MODULE = "benchmarks.train_cost_quantized"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train_cost_quantized",
        description="Step time and peak memory of gate training vs QLoRA r=16 on the same bitsandbytes 4-bit "
        "base, batch and sequence length, one fresh subprocess per method within ONE run; prints a table "
        "with ratios vs --baseline and writes <out>/<name>.json. CPU memory is process RSS (see the module "
        "docstring), CUDA memory is torch.cuda.max_memory_allocated.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train_cost.add_measurement_args(parser, METHODS, DEFAULT_METHODS, "qlora16")
    parser.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    parser.add_argument("--no-double-quant", action="store_true", help="without bnb_4bit_use_double_quant")
    parser.add_argument("--name", default="train_cost_quantized", help="stem of the output files")
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    common.add_common_args(parser)
    parser.set_defaults(size="tiny", seq_len=64, rounds=2)  # a small CPU setting by default
    parser.set_defaults(threads=1)  # tiny CPU matmuls: one thread is faster and far less noisy than two
    return parser


# ------------------------------------------------------------------------------------------------ worker


def quantization_config(args: argparse.Namespace, device: torch.device) -> Any:
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.quant_type,
        bnb_4bit_use_double_quant=not args.no_double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Load the 4-bit base, wrap it with one method and time its training steps, in this fresh process."""
    from transformers import AutoModelForCausalLM

    from peft_gates.quantization import prepare_quantized_for_gates

    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype("auto", device)
    torch.manual_seed(0)
    common.reset_cuda_peak(device)
    model = AutoModelForCausalLM.from_pretrained(
        args.checkpoint,
        quantization_config=quantization_config(args, device),
        device_map=str(device) if device.type == "cpu" else {"": device.index or 0},
        dtype=dtype,
    )
    prepare_quantized_for_gates(model)
    weights_mib = common.cuda_peak_mib(device)
    rss_loaded = common.rss_mib()
    # QLoRA is train_cost's LoRA r=16 on a 4-bit base: one adapter definition for both scripts.
    model = train_cost.wrap("lora16" if args.worker == "qlora16" else args.worker, model, args.lora_r)
    model.train()
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    step, params = train_cost.training_step(model, args.batch_size, args.seq_len, device)
    cost = train_cost.measure_steps(step, args, device, sample_warmup=False)
    return {
        "method": args.worker,
        "trainable_params": common.count_parameters(model, trainable=True),
        "trainable_dtypes": sorted({str(p.dtype) for p in params}),
        **cost.timing_fields(),
        "cuda_loaded_mib": weights_mib,
        "cuda_peak_mib": common.cuda_peak_mib(device),
        "rss_loaded_mib": rss_loaded,
        "rss_before_steps_mib": cost.rss_before_mib,
        "rss_train_peak_mib": cost.rss_peak_mib,
        "rss_increment_mib": cost.rss_peak_mib - cost.rss_before_mib,
        "device": str(device),
        "compute_dtype": str(dtype),
    }


# ------------------------------------------------------------------------------------------------ parent


def save_checkpoint(args: argparse.Namespace, root: Path) -> Path:
    """The dense base on disk, which every worker loads in 4 bit: the user's ``from_pretrained`` path."""
    path = root / "base"
    common.load_base_model(args.size, args.weights).save_pretrained(path)
    return path


def worker_argv(args: argparse.Namespace, method: str, checkpoint: Path) -> list[str]:
    """train_cost's worker command line plus the checkpoint and the quantization options."""
    extra = ["--checkpoint", str(checkpoint), "--quant-type", args.quant_type]
    if args.no_double_quant:
        extra.append("--no-double-quant")
    return train_cost.worker_argv(args, method, extra)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure every method (one subprocess each, alternating over rounds); print and save the ratios."""
    args = build_parser().parse_args(argv)
    if args.worker:
        return common.serve_worker(args, worker)
    common.setup_run(args)
    common.require("bitsandbytes", "bitsandbytes")
    methods = train_cost.checked_methods(args, METHODS)
    if args.size != "135m":
        args.weights = "random"  # only SmolLM2-135M ships real weights
    device = common.resolve_device(args.device)
    root = Path(tempfile.mkdtemp(prefix="peft_gates_bench_q4_"))
    try:
        checkpoint = save_checkpoint(args, root)
        rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for method in train_cost.round_order(methods, args.rounds):
            print(f"measuring {method} ...", flush=True)
            rounds[method].append(common.run_worker(MODULE, worker_argv(args, method, checkpoint)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results = train_cost.best_rounds(methods, rounds)
    cuda = device.type == "cuda"
    ratios = {"step_ratio": "step_s", "trainable_ratio": "trainable_params"}
    if cuda:
        ratios["mem_ratio"] = "cuda_peak_mib"
    else:
        ratios |= {"mem_ratio": "rss_train_peak_mib", "increment_ratio": "rss_increment_mib"}
    train_cost.add_ratios(results, args.baseline, ratios)
    quant = f"{args.quant_type}{'' if args.no_double_quant else ' + double quant'}"
    model_desc = f"{args.size} ({'SmolLM2 real weights' if args.weights == 'real' else 'random weights'})"
    title = (
        f"4-bit ({quant}) training step, {model_desc}, compute {results[0]['compute_dtype']} on {device}, "
        f"batch {args.batch_size} x {args.seq_len}{', gradient checkpointing' if args.grad_ckpt else ''}; "
        f"median of {args.steps} steps, best of {args.rounds} rounds, ratios vs {args.baseline}"
    )
    if cuda:
        mem_cols = [
            common.Column("cuda_peak_mib", "peak CUDA alloc MiB", "{:,.0f}"),
            common.Column("mem_ratio", "memory ratio", "{:.2f}x"),
        ]
    else:
        mem_cols = [
            common.Column("rss_train_peak_mib", "peak RSS MiB", "{:,.0f}"),
            common.Column("mem_ratio", "peak ratio", "{:.2f}x"),
            common.Column("rss_increment_mib", "RSS increment MiB", "{:,.1f}"),
            common.Column("increment_ratio", "increment ratio", "{:.2f}x"),
        ]
    table = common.print_table(
        results,
        [
            common.Column("method", "method"),
            common.Column("trainable_params", "trainable params", "{:,}"),
            common.Column("step_s", "step s", "{:.3f}"),
            common.Column("step_ratio", "time ratio", "{:.2f}x"),
            *mem_cols,
        ],
        title,
    )
    payload = {
        "size": args.size,
        "weights": args.weights,
        "quantization": {"quant_type": args.quant_type, "double_quant": not args.no_double_quant},
        "device": str(device),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "grad_ckpt": args.grad_ckpt,
        "baseline": args.baseline,
        "memory_measure": "torch.cuda.max_memory_allocated over the timed steps"
        if cuda
        else "process RSS sampled every 2 ms during the timed steps (peak, and increment over pre-step RSS)",
        "table": table,
        "results": results,
    }
    path = common.write_json(payload, args.name, args.out_dir, device=device)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    raise SystemExit(common.cli(main))
