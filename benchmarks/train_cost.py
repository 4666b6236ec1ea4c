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

``train_cost_quantized.py`` is the same measurement on a 4-bit base; it reuses the options, the training
step, the step timing, the worker command line and the round/ratio bookkeeping defined here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from peft_gates.cli import non_negative_int, positive_int
from peft_gates.latency import TimingStats, synchronize, time_fn

try:  # `python -m benchmarks.train_cost` / tests
    from benchmarks import common
except ImportError:  # `python benchmarks/train_cost.py`
    import common  # type: ignore[no-redef]

METHODS = ("lora16", "ia3", "gates-both", "gates-rows", "gates-units", "gates-units-scales")
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
    add_measurement_args(parser, METHODS, METHODS, "lora16")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="auto = float32 on CPU, bfloat16 on CUDA")  # fmt: skip
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure every method in this process, no subprocesses: fast, but CPU memory numbers then "
        "carry earlier methods' pages (smoke tests only)",
    )
    parser.add_argument("--name", default="train_cost", help="stem of the output files")
    common.add_common_args(parser)
    return parser


def add_measurement_args(
    parser: argparse.ArgumentParser, methods: Sequence[str], default_methods: Sequence[str], baseline: str
) -> None:
    """The options both train-cost scripts share: model, device, batch, steps, methods, rounds, ``--worker``.

    One definition keeps their meaning (and :func:`worker_argv`, which passes them on) the same in both.
    """
    common.add_model_args(parser)
    parser.add_argument("--batch-size", type=positive_int, default=2, help="sequences per training step")
    parser.add_argument("--seq-len", type=positive_int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=positive_int, default=5, help="timed training steps per method")
    parser.add_argument(
        "--warmup", type=non_negative_int, default=2, help="untimed steps first (allocator, kernels)"
    )
    parser.add_argument("--methods", default=",".join(default_methods), help=f"from {tuple(methods)}")
    parser.add_argument("--baseline", default=baseline, help="the method ratios are relative to")
    parser.add_argument(
        "--lora-r",
        type=positive_int,
        default=16,
        help="rank of the LoRA baseline (alpha = 2 r, all Linears)",
    )
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (non-reentrant)")
    parser.add_argument("--rounds", type=positive_int, default=1,
                        help="measure every method this many times, alternating order; keep each method's "
                        "fastest round (a shared CPU's noise only ever adds time)")  # fmt: skip
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


# --------------------------------------------------------------------------------------------- worker


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
        placement, _, scales = method.removeprefix("gates-").partition("-")
        config = GateConfig(
            task_type="CAUSAL_LM",
            placement=placement,
            scale_gates="both" if scales else "none",
            target_sparsity=0.3,
        )
    return get_peft_model(model, config)


def training_step(
    model: torch.nn.Module, batch_size: int, seq_len: int, device: torch.device
) -> tuple[Callable[[], None], list[torch.nn.Parameter]]:
    """One training step of ``model`` on a fixed random token batch, and the parameters it trains.

    Forward + backward + AdamW step, plus setting lambda for gates as the Trainer callback does; the same
    step for every method (and both scripts), so only the method differs between measurements.
    """
    from peft_gates.training import find_gate_model

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    gate_model = find_gate_model(model)
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
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

    return step, params


@dataclass
class StepCost:
    """Timed training steps and the process RSS around them (MiB)."""

    timing: TimingStats
    tokens_per_step: int
    rss_before_mib: float
    rss_peak_mib: float

    def timing_fields(self) -> dict[str, Any]:
        """The ``step_time``, ``step_s`` (median) and ``tokens_per_s`` keys of a result row."""
        return {
            "step_time": self.timing.to_dict(),
            "step_s": self.timing.median_s,
            "tokens_per_s": self.tokens_per_step / self.timing.median_s,
        }


def measure_steps(
    step: Callable[[], None], args: argparse.Namespace, device: torch.device, *, sample_warmup: bool
) -> StepCost:
    """``--warmup`` untimed then ``--steps`` timed calls of ``step`` (``args``: :func:`add_measurement_args`).

    Both scripts time a step here, so their numbers mean the same. The CUDA peak is reset after the
    warm-up: it covers the timed steps. ``sample_warmup`` sets what the RSS figures cover: with it, the
    baseline is taken before the warm-up and the sampler runs through it, so the increment includes the
    optimizer state the first step creates; without it, both cover the timed steps only (the steady state
    of a warm step).
    """
    if not sample_warmup:
        for _ in range(args.warmup):
            step()
    synchronize(device)
    rss_before = common.rss_mib()
    with common.RssSampler() as sampler:
        if sample_warmup:
            for _ in range(args.warmup):
                step()
            synchronize(device)
        common.reset_cuda_peak(device)
        timing = time_fn(step, repeats=args.steps, warmup=0, device=device)
    return StepCost(timing, args.batch_size * args.seq_len, rss_before, sampler.peak)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one method in this (fresh) process."""
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    model = common.load_base_model(args.size, args.weights, dtype, device)
    with torch.no_grad():  # page in every weight (safetensors may be memory-mapped): a stable RSS baseline
        for param in model.parameters():
            param.sum()
    rss_loaded = common.rss_mib()
    model = wrap(args.worker, model, args.lora_r)
    model.train()
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    step, _ = training_step(model, args.batch_size, args.seq_len, device)
    # The RSS baseline is weights, adapter and an empty optimizer; the warm-up is sampled because the
    # optimizer state appears in the first step, and it is training memory.
    cost = measure_steps(step, args, device, sample_warmup=True)
    return {
        "method": args.worker,
        "trainable_params": common.count_parameters(model, trainable=True),
        "total_params": common.count_parameters(model),
        **cost.timing_fields(),
        "cuda_peak_mib": common.cuda_peak_mib(device),
        "rss_loaded_mib": rss_loaded,
        "rss_setup_mib": cost.rss_before_mib,
        "rss_train_peak_mib": cost.rss_peak_mib,
        "rss_increment_mib": cost.rss_peak_mib - cost.rss_before_mib,
        "rss_process_peak_mib": common.peak_rss_mib(),
        "device": str(device),
        "dtype": str(dtype),
    }


# --------------------------------------------------------------------------------------------- parent


def worker_argv(args: argparse.Namespace, method: str, extra: Sequence[str] = ()) -> list[str]:
    """The worker's command line: ``--worker``, the :func:`add_measurement_args` settings, then ``extra``.

    ``extra`` carries the options only one script has, so both pass the shared ones the same way.
    """
    argv = ["--worker", method, "--size", args.size, "--weights", args.weights, "--device", args.device,
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--lora-r", str(args.lora_r), "--threads", str(args.threads),
            "--out-dir", str(args.out_dir)]  # fmt: skip
    return argv + (["--grad-ckpt"] if args.grad_ckpt else []) + list(extra)


def checked_methods(args: argparse.Namespace, known: Sequence[str]) -> list[str]:
    """``--methods`` as a list; unknown names or a ``--baseline`` outside it stop the run before it starts."""
    methods = common.parse_list(args.methods)
    unknown = sorted(set(methods) - set(known))
    if unknown:
        raise SystemExit(f"error: unknown --methods {unknown}; choose from {tuple(known)}")
    if args.baseline not in methods:
        raise SystemExit(f"error: --baseline {args.baseline} is not among --methods {methods}")
    return methods


def round_order(methods: Sequence[str], rounds: int) -> list[str]:
    """Every method once per round, the order reversed every other round (no method always goes first)."""
    return [m for r in range(rounds) for m in (methods if r % 2 == 0 else methods[::-1])]


def best_rounds(methods: Sequence[str], rounds: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each method's fastest round (a shared CPU's noise only ever adds time), with all rounds' step times."""
    return [min(rounds[m], key=lambda r: r["step_s"]) | {"rounds_step_s": [r["step_s"] for r in rounds[m]]}
            for m in methods]  # fmt: skip


def add_ratios(results: list[dict[str, Any]], baseline: str, ratios: dict[str, str]) -> None:
    """``row[ratio] = row[key] / baseline_row[key]`` for each ``ratio: key``; None where the baseline's is 0.

    A zero baseline happens for the RSS increment (the sampler saw no growth), where no ratio exists.
    """
    base = next(r for r in results if r["method"] == baseline)
    for row in results:
        for ratio, key in ratios.items():
            row[ratio] = row[key] / base[key] if base[key] > 0 else None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure every method (one subprocess each) and report ratios; returns what the JSON holds."""
    args = build_parser().parse_args(argv)
    if args.worker:
        return common.serve_worker(args, worker)
    common.setup_run(args)
    methods = checked_methods(args, METHODS)
    if args.weights == "real" and args.size != "135m":
        args.weights = "random"  # only SmolLM2-135M ships real weights; larger shapes come from configs
    device = common.resolve_device(args.device)
    rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for method in tqdm(round_order(methods, args.rounds), desc="methods", unit="method"):
        if args.in_process:
            rounds[method].append(worker(argparse.Namespace(**{**vars(args), "worker": method})))
        else:
            rounds[method].append(
                common.run_worker(MODULE, worker_argv(args, method, ["--dtype", args.dtype]))
            )
    results = best_rounds(methods, rounds)
    mem_key = "cuda_peak_mib" if device.type == "cuda" else "rss_train_peak_mib"
    ratios = {
        "step_ratio": "step_s",
        "mem_ratio": mem_key,
        "increment_ratio": "rss_increment_mib",
        "trainable_ratio": "trainable_params",
    }
    add_ratios(results, args.baseline, ratios)
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
