"""Training cost of gates vs LoRA r=16 vs IA3: step time and peak memory on the same model, batch and length.

One invocation measures every method, each in a fresh subprocess (same seed, same random token batch), and
reports ratios against ``--baseline`` (LoRA r=16 by default). A training step is forward + backward +
AdamW step (+ setting lambda for gates, as the Trainer callback does), with the base model frozen.

Memory, honestly:

* CUDA: ``torch.cuda.max_memory_allocated`` over the timed steps (tensors only; reset after the warm-up
  steps), i.e. weights + activations + gradients + optimizer state.
* CPU: there is no torch-aware peak counter, and ``tracemalloc`` does not see torch's allocator. We report
  the resident set size (RSS) of the worker process: ``train peak`` is the highest RSS sampled every 2 ms
  by a background thread over the warm-up and timed steps, ``increment`` is that minus the RSS after
  set-up (weights paged in, adapter added, optimizer built, before the first step): the cost of
  activations, gradients and optimizer state, which is what differs between methods. ``process peak`` is
  the kernel's high-water mark (``getrusage``), loading included. RSS counts pages, not tensors (the
  allocator may keep freed memory), so compare increments between methods rather than read them as bytes
  of tensors.

Defaults: SmolLM2-135M with its real weights on CPU, batch 2 x 128 tokens, 2 warm-up + 5 timed steps.
GPU: ``--device cuda --size 1b`` builds a Llama-3.2-1B-shaped model from its config (random weights;
speed does not depend on their values) in bf16.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from peft_gates.latency import synchronize, time_fn

try:  # `python -m benchmarks.train_cost` / tests
    from benchmarks import common
except ImportError:  # `python benchmarks/train_cost.py`
    import common  # type: ignore[no-redef]

METHODS = ("lora16", "ia3", "gates-both", "gates-rows", "gates-units")
MODULE = "benchmarks.train_cost"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train_cost",
        description="Step time and peak memory of one training step of gates vs LoRA r=16 vs IA3 on the "
        "same frozen model, batch and sequence length, each method in a fresh subprocess of ONE run; prints "
        "a table of absolute numbers and ratios vs --baseline, writes <out>/<name>.json and a PNG. Memory "
        "on CUDA: torch.cuda.max_memory_allocated over the timed steps. On CPU (no torch-aware counter): "
        "process RSS sampled every 2 ms over the warm-up and timed steps; 'increment' = that peak minus the "
        "RSS after set-up (weights, adapter, optimizer built), i.e. activations + gradients + optimizer "
        "state, the part that differs between methods. Timings on a shared CPU are noisy: use --rounds.",
        formatter_class=common.HelpFormatter,
    )
    parser.add_argument(
        "--size",
        choices=("135m", "1b", "tiny"),
        default="135m",
        help="135m = SmolLM2-135M shape, 1b = Llama-3.2-1B shape, tiny = 2-layer smoke-test model",
    )
    parser.add_argument(
        "--weights",
        choices=("real", "random"),
        default="real",
        help="real = SmolLM2-135M-Instruct weights (135m only); random = built from the config",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="auto = float32 on CPU, bfloat16 on CUDA")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per training step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, kernels)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"from {METHODS}")
    parser.add_argument("--baseline", default="lora16", help="the method ratios are relative to")
    parser.add_argument(
        "--lora-r", type=int, default=16, help="rank of the LoRA baseline (alpha = 2 r, all Linears)"
    )
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (non-reentrant)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every method this many times, alternating order; keep each method's "
                        "fastest round (a shared CPU's noise only ever adds time)")  # fmt: skip
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure every method in this process, no subprocesses: fast, but CPU memory numbers then "
        "carry earlier methods' pages (smoke tests only)",
    )
    parser.add_argument("--name", default="train_cost", help="stem of the output files")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    common.add_common_args(parser)
    return parser


# --------------------------------------------------------------------------------------------- worker


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The frozen base model: SmolLM2 real weights, or a Llama of the chosen shape from its config."""
    if args.size == "135m" and args.weights == "real":
        from peft_gates import assets

        model, _ = common.load_asset(assets.load_smollm2, dtype=dtype)
    else:
        shape = {"135m": "smollm2", "1b": "1b", "tiny": "tiny"}[args.size]
        with torch.device(device):
            model = common.llama_from_config(shape, dtype=dtype)
    return model.to(device)


def wrap(method: str, model: torch.nn.Module, lora_r: int) -> torch.nn.Module:
    """Apply one method to every Linear it targets (LoRA and gates: every block Linear; IA3: its defaults)."""
    from peft import IA3Config, LoraConfig, get_peft_model

    from peft_gates import GateConfig

    if method == "lora16":
        config = LoraConfig(
            task_type="CAUSAL_LM", r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear"
        )
    elif method == "ia3":
        config = IA3Config(task_type="CAUSAL_LM")
    else:
        placement = method.removeprefix("gates-")
        config = GateConfig(task_type="CAUSAL_LM", placement=placement, target_sparsity=0.3)
    return get_peft_model(model, config)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one method in this (fresh) process."""
    from peft_gates.training import find_gate_model

    device = common.resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    model = build_model(args, device, dtype)
    with torch.no_grad():  # page in every weight (safetensors may be memory-mapped): a stable RSS baseline
        for param in model.parameters():
            param.sum()
    rss_loaded = common.rss_mib()
    model = wrap(args.worker, model, args.lora_r)
    model.train()
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    gate_model = find_gate_model(model)
    vocab = model.config.vocab_size
    batch = torch.randint(
        0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0)
    )
    batch = batch.to(device)
    counter = {"step": 0}

    def step() -> None:
        if gate_model is not None:  # what GateTrainerCallback does at every optimizer step
            gate_model.set_sparsity_step(counter["step"])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        counter["step"] += 1

    synchronize(device)
    rss_before = common.rss_mib()  # weights, adapter, empty optimizer: what differs later is training memory
    with common.RssSampler() as sampler:  # warm-up steps included: the optimizer state appears in the first
        for _ in range(args.warmup):
            step()
        synchronize(device)
        common.reset_cuda_peak(device)
        timing = time_fn(step, repeats=args.steps, warmup=0, device=device)
    return {
        "method": args.worker,
        "trainable_params": common.count_parameters(model, trainable=True),
        "total_params": common.count_parameters(model),
        "step_time": timing.to_dict(),
        "step_s": timing.median_s,
        "tokens_per_s": args.batch_size * args.seq_len / timing.median_s,
        "cuda_peak_mib": common.cuda_peak_mib(device),
        "rss_loaded_mib": rss_loaded,
        "rss_setup_mib": rss_before,
        "rss_train_peak_mib": sampler.peak,
        "rss_increment_mib": sampler.peak - rss_before,
        "rss_process_peak_mib": common.peak_rss_mib(),
        "device": str(device),
        "dtype": str(dtype),
    }


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


# --------------------------------------------------------------------------------------------- parent


def worker_argv(args: argparse.Namespace, method: str) -> list[str]:
    """The worker's command line: the parent's measurement settings plus ``--worker``."""
    argv = ["--worker", method, "--size", args.size, "--weights", args.weights, "--device", args.device,
            "--dtype", args.dtype, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--lora-r", str(args.lora_r),
            "--threads", str(args.threads), "--out-dir", str(args.out_dir)]  # fmt: skip
    return argv + (["--grad-ckpt"] if args.grad_ckpt else [])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure every method (one subprocess each) and report ratios; returns what the JSON holds."""
    args = build_parser().parse_args(argv)
    if args.worker:
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        result = worker(args)
        common.emit_worker_result(result)
        return result
    common.setup_run(args)
    methods = common.parse_list(args.methods)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"error: unknown --methods {unknown}; choose from {METHODS}")
    if args.baseline not in methods:
        raise SystemExit(f"error: --baseline {args.baseline} is not among --methods {methods}")
    if args.weights == "real" and args.size != "135m":
        args.weights = "random"  # only SmolLM2-135M ships real weights; larger shapes come from configs
    device = common.resolve_device(args.device)
    order = [m for r in range(args.rounds) for m in (methods if r % 2 == 0 else methods[::-1])]
    rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for method in tqdm(order, desc="methods", unit="method"):
        if args.in_process:
            rounds[method].append(worker(argparse.Namespace(**{**vars(args), "worker": method})))
        else:
            rounds[method].append(common.run_worker(MODULE, worker_argv(args, method)))
    results = [min(rounds[m], key=lambda r: r["step_s"]) | {"rounds_step_s": [r["step_s"] for r in rounds[m]]}
               for m in methods]  # fmt: skip
    base = next(r for r in results if r["method"] == args.baseline)
    mem_key = "cuda_peak_mib" if device.type == "cuda" else "rss_train_peak_mib"
    for r in results:
        r["step_ratio"] = r["step_s"] / base["step_s"]
        r["mem_ratio"] = r[mem_key] / base[mem_key]
        r["increment_ratio"] = (
            r["rss_increment_mib"] / base["rss_increment_mib"] if base["rss_increment_mib"] > 0 else None
        )
        r["trainable_ratio"] = r["trainable_params"] / base["trainable_params"]
    model_desc = (
        f"{args.size} ({'SmolLM2 real weights' if args.weights == 'real' else 'random, from config'})"
    )
    title = (
        f"Training step, {model_desc}, {results[0]['dtype']} on {device}, batch {args.batch_size} x "
        f"{args.seq_len} tokens{', gradient checkpointing' if args.grad_ckpt else ''}; median of "
        f"{args.steps} steps, ratios vs {args.baseline}"
    )
    if device.type == "cuda":
        mem_cols = [
            common.Column("cuda_peak_mib", "peak CUDA alloc MiB (max_memory_allocated)", "{:,.0f}"),
            common.Column("mem_ratio", "mem ratio", "{:.2f}x"),
        ]
    else:
        mem_cols = [
            common.Column(
                "rss_train_peak_mib", "peak RSS during steps MiB (process, not torch-aware)", "{:,.0f}"
            ),
            common.Column("rss_increment_mib", "RSS increment over set-up MiB", "{:,.0f}"),
            common.Column("increment_ratio", "increment ratio", "{:.2f}x"),
        ]
    common.print_table(
        results,
        [
            common.Column("method", "method"),
            common.Column("trainable_params", "trainable params", "{:,}"),
            common.Column("step_s", "step s (median)", "{:.3f}"),
            common.Column("step_ratio", "time ratio", "{:.2f}x"),
            *mem_cols,
        ],
        title,
    )
    payload = {
        "size": args.size,
        "weights": args.weights,
        "device": str(device),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "grad_ckpt": args.grad_ckpt,
        "baseline": args.baseline,
        "memory_measure": "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "process RSS sampling",
        "results": results,
    }
    path = common.write_json(payload, args.name, args.out_dir, device=device)
    print(f"wrote {path}")
    if not args.no_plots:
        print(f"wrote {plot(results, args, mem_key)}")
    return payload


def plot(results: list[dict[str, Any]], args: argparse.Namespace, mem_key: str) -> Any:
    """Bars of time and memory ratios vs the baseline."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = [r["method"] for r in results]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [r["step_ratio"] for r in results], width=0.4, label="step time")
    key = "mem_ratio" if mem_key == "cuda_peak_mib" else "increment_ratio"
    label = "peak memory" if key == "mem_ratio" else "RSS increment"
    ax.bar([i + 0.2 for i in x], [r[key] or 0 for r in results], width=0.4, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(x), names)
    ax.set_ylabel(f"ratio vs {args.baseline}")
    ax.set_title(f"Training cost, {args.size}, batch {args.batch_size} x {args.seq_len}")
    ax.legend()
    return common.save_figure(fig, args.out_dir / f"{args.name}.png")


if __name__ == "__main__":
    raise SystemExit(common.cli(main))
