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
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from peft_gates.latency import synchronize, time_fn

try:  # `python -m benchmarks.train_cost_quantized`
    from benchmarks import common
except ImportError:  # `python benchmarks/train_cost_quantized.py`
    import common  # type: ignore[no-redef]

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
    parser.add_argument(
        "--size",
        choices=("tiny", "135m", "1b"),
        default="tiny",
        help="tiny: 2-layer random Llama; 135m: SmolLM2-135M; 1b: Llama-3.2-1B shape",
    )
    parser.add_argument(
        "--weights",
        choices=("real", "random"),
        default="real",
        help="real: SmolLM2-135M-Instruct weights (135m only); random: from the config",
    )
    parser.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    parser.add_argument("--no-double-quant", action="store_true", help="without bnb_4bit_use_double_quant")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"from {METHODS}")
    parser.add_argument("--baseline", default="qlora16", help="the method ratios are relative to")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (non-reentrant)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="measure every method this many times, alternating the order; keep each "
                        "method's fastest round (a shared CPU's noise only ever adds time)")  # fmt: skip
    parser.add_argument("--name", default="train_cost_quantized", help="stem of the output files")
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    common.add_common_args(parser)
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


def wrap(method: str, model: torch.nn.Module, lora_r: int) -> torch.nn.Module:
    """QLoRA: LoRA on every block Linear. Gates: the paper's rows+columns, rows only, or units."""
    from peft import LoraConfig, get_peft_model

    from peft_gates import GateConfig

    if method == "qlora16":
        config = LoraConfig(
            task_type="CAUSAL_LM", r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear"
        )
    else:
        config = GateConfig(
            task_type="CAUSAL_LM", placement=method.removeprefix("gates-"), target_sparsity=0.3
        )
    return get_peft_model(model, config)


class RssSampler:
    """Highest RSS seen by a 2 ms polling thread during a window (``getrusage`` has no resettable peak)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, common.rss_mib())
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = common.rss_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, common.rss_mib())


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Load the 4-bit base, wrap it with one method and time its training steps, in this fresh process."""
    from transformers import AutoModelForCausalLM

    from peft_gates.quantization import prepare_quantized_for_gates
    from peft_gates.training import find_gate_model

    device = common.resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
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
    model = wrap(args.worker, model, args.lora_r)
    model.train()
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    gate_model = find_gate_model(model)
    tokens = torch.randint(
        0,
        model.config.vocab_size,
        (args.batch_size, args.seq_len),
        generator=torch.Generator().manual_seed(0),
    ).to(device)
    counter = {"step": 0}

    def step() -> None:
        if gate_model is not None:  # what GateTrainerCallback does at every optimizer step
            gate_model.set_sparsity_step(counter["step"])
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        counter["step"] += 1

    for _ in range(args.warmup):
        step()
    synchronize(device)
    rss_before = common.rss_mib()
    common.reset_cuda_peak(device)
    with RssSampler() as sampler:
        timing = time_fn(step, repeats=args.steps, warmup=0, device=device)
    return {
        "method": args.worker,
        "trainable_params": common.count_parameters(model, trainable=True),
        "trainable_dtypes": sorted({str(p.dtype) for p in params}),
        "step_time": timing.to_dict(),
        "step_s": timing.median_s,
        "tokens_per_s": args.batch_size * args.seq_len / timing.median_s,
        "cuda_loaded_mib": weights_mib,
        "cuda_peak_mib": common.cuda_peak_mib(device),
        "rss_loaded_mib": rss_loaded,
        "rss_before_steps_mib": rss_before,
        "rss_train_peak_mib": sampler.peak,
        "rss_increment_mib": sampler.peak - rss_before,
        "device": str(device),
        "compute_dtype": str(dtype),
    }


# ------------------------------------------------------------------------------------------------ parent


def save_checkpoint(args: argparse.Namespace, root: Path) -> Path:
    """The dense base on disk, which every worker loads in 4 bit: the user's ``from_pretrained`` path."""
    path = root / "base"
    if args.size == "135m" and args.weights == "real":
        from peft_gates import assets

        model, _ = common.load_asset(assets.load_smollm2, dtype=torch.float32)
    else:
        model = common.llama_from_config({"tiny": "tiny", "135m": "smollm2", "1b": "1b"}[args.size])
    model.save_pretrained(path)
    return path


def worker_argv(args: argparse.Namespace, method: str, checkpoint: Path) -> list[str]:
    argv = ["--worker", method, "--checkpoint", str(checkpoint), "--size", args.size,
            "--weights", args.weights, "--quant-type", args.quant_type, "--device", args.device,
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--lora-r", str(args.lora_r), "--threads", str(args.threads),
            "--out-dir", str(args.out_dir)]  # fmt: skip
    return (
        argv
        + (["--grad-ckpt"] if args.grad_ckpt else [])
        + (["--no-double-quant"] if args.no_double_quant else [])
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure every method (one subprocess each, alternating over rounds); print and save the ratios."""
    args = build_parser().parse_args(argv)
    if args.worker:
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        result = worker(args)
        common.emit_worker_result(result)
        return result
    common.setup_run(args)
    common.require("bitsandbytes", "bitsandbytes")
    methods = common.parse_list(args.methods)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"error: unknown --methods {unknown}; choose from {METHODS}")
    if args.baseline not in methods:
        raise SystemExit(f"error: --baseline {args.baseline} is not among --methods {methods}")
    if args.size != "135m":
        args.weights = "random"  # only SmolLM2-135M ships real weights
    device = common.resolve_device(args.device)
    root = Path(tempfile.mkdtemp(prefix="peft_gates_bench_q4_"))
    try:
        checkpoint = save_checkpoint(args, root)
        order = [m for r in range(args.rounds) for m in (methods if r % 2 == 0 else methods[::-1])]
        rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for method in order:
            print(f"measuring {method} ...", flush=True)
            rounds[method].append(common.run_worker(MODULE, worker_argv(args, method, checkpoint)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results = [
        min(rounds[m], key=lambda r: r["step_s"]) | {"rounds_step_s": [r["step_s"] for r in rounds[m]]}
        for m in methods
    ]
    base = next(r for r in results if r["method"] == args.baseline)
    cuda = device.type == "cuda"
    for r in results:
        r["step_ratio"] = r["step_s"] / base["step_s"]
        r["trainable_ratio"] = r["trainable_params"] / base["trainable_params"]
        if cuda:
            r["mem_ratio"] = r["cuda_peak_mib"] / base["cuda_peak_mib"]
        else:
            r["mem_ratio"] = r["rss_train_peak_mib"] / base["rss_train_peak_mib"]
            r["increment_ratio"] = (
                r["rss_increment_mib"] / base["rss_increment_mib"] if base["rss_increment_mib"] > 0 else None
            )
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
