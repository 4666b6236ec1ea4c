"""Every GPU measurement of the targets in one command, sized for a short lease of a GPU machine.

A GPU is lent to this project rarely and for minutes, so what it must measure is prepared here and run
as one command: the training cost of gates vs LoRA r=16 vs IA3 on a Llama-3.2-1B-shaped model, dense vs
pruned inference at 10-40% of block parameters removed with and without width alignment, and the user's
path (a saved base and gate adapter, ``peft-gates prune``, ``peft-gates bench``). Each step runs in its
own process group under a time limit cut from one overall ``--budget-s``, so a step that fails or runs
over is killed and reported and the next one still runs; every file goes straight into ``--out-dir``.
The run ends with the GPU targets, measured against their thresholds, in ``gpu_check.json``.

On the device machine of this workplace torch, transformers, peft, accelerate and matplotlib are
installed; bitsandbytes, for the 4-bit part, travels as a wheel (docs/benchmarks.md). Without it that part
is reported unmeasured, and the rest runs::

    python -m benchmarks.gpu_check --out-dir "$OUT"

``--smoke`` runs the same steps on the CPU with a tiny random model and a handful of repeats: what the
tests run, so the command cannot rot between leases. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:  # `python -m benchmarks.gpu_check` / tests
    from benchmarks import common
except ImportError:  # `python benchmarks/gpu_check.py`
    import common  # type: ignore[no-redef]

#: The thresholds of the GPU targets (issue 6): training vs LoRA r=16 at the same batch, inference at 30%
#: of block parameters removed, and never slower than dense.
STEP_TIME_MAX, MEMORY_MAX = 0.8, 0.9
PREFILL_MIN, DECODE_MIN, NEVER_SLOWER = 1.3, 1.25, 1.0
TARGET_SHARE = 0.3

GATE_METHODS = ("gates-units", "gates-units-scales", "gates-both")


#: The parts a run can be limited to (``--only``), in the order they run: the targets first, the extras
#: last, so that a budget cut short loses the least. ``cli`` is three steps: export, prune, bench.
PARTS = ("inference", "train_cost", "cli", "train_cost_4bit")


@dataclass(frozen=True)
class Setting:
    """The sizes of one run: the full GPU measurement, or the CPU smoke run of the same steps.

    ``args`` holds each part's own options, ``limits_s`` the most each part may take (``cli``: its three
    steps together).
    """

    device: str
    size: str
    args: dict[str, tuple[str, ...]]
    limits_s: dict[str, int]


SETTINGS = {
    "gpu": Setting(
        device="cuda",
        size="1b",
        args={
            "inference": ("--prefill-batch", "8", "--prefill-len", "512", "--decode-batch", "32",
                          "--prompt-len", "512", "--new-tokens", "32", "--repeats", "5", "--warmup", "2",
                          "--rounds", "3"),
            "train_cost": ("--batch-size", "8", "--seq-len", "512", "--grad-ckpt", "--steps", "10",
                           "--warmup", "3", "--rounds", "2"),
            "cli": ("--batch", "8", "--seq", "512", "--new-tokens", "32", "--repeats", "5", "--warmup", "2",
                    "--rounds", "3"),
            "train_cost_4bit": ("--batch-size", "8", "--seq-len", "512", "--grad-ckpt", "--steps", "10",
                                "--warmup", "3", "--methods", "qlora16,gates-units", "--rounds", "1"),
        },
        limits_s={"inference": 240, "train_cost": 210, "cli": 240, "train_cost_4bit": 150},
    ),
    "smoke": Setting(
        device="cpu",
        size="tiny",
        args={
            "inference": ("--prefill-batch", "2", "--prefill-len", "16", "--decode-batch", "2",
                          "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1", "--warmup", "0",
                          "--sparsities", "0.1,0.3"),
            "train_cost": ("--batch-size", "2", "--seq-len", "16", "--steps", "2", "--warmup", "1",
                           "--in-process"),
            "cli": ("--batch", "2", "--seq", "16", "--new-tokens", "4", "--repeats", "1", "--warmup", "0",
                    "--rounds", "2"),
            "train_cost_4bit": ("--batch-size", "2", "--seq-len", "16", "--steps", "2", "--warmup", "1",
                                "--methods", "qlora16,gates-units", "--rounds", "1"),
        },
        limits_s={"inference": 120, "train_cost": 120, "cli": 120, "train_cost_4bit": 120},
    ),
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description="The GPU targets in one command: training cost (gates vs LoRA r=16 vs IA3, 1B Llama "
        "shape, bf16), dense vs pruned inference (10-40 percent removed, widths x1 and x128), the command "
        "line on a saved export and the 4-bit training cost, each step in its own process under a share "
        "of --budget-s. Writes every step's JSON/PNG, a log and gpu_check.json (targets vs thresholds) "
        "into --out-dir; exits 1 if a step failed (targets missed are results, not failures).",
        formatter_class=common.HelpFormatter,
    )
    parser.add_argument("--out-dir", type=Path, required=True, help="where every file goes (e.g. $OUT)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        help="wall-clock seconds for all steps together; keep it under the machine's command limit",
    )
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run, from {PARTS} (a rerun of what a first lease left unmeasured)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny random model, few repeats: checks the plumbing only"
    )
    parser.add_argument("--export", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


# --------------------------------------------------------------------------------------------- steps


def run_step(name: str, argv: Sequence[str], limit_s: float, log: Path) -> dict[str, Any]:
    """Run ``python argv`` in its own process group, output appended to ``log``; kill it past ``limit_s``.

    A process group, because the training-cost step starts one worker per method: killing only the
    parent would leave a worker holding the GPU for the next step.
    """
    env = common.repo_env()
    env.setdefault("PYTHONUNBUFFERED", "1")
    start = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n===== {name}: python {' '.join(argv)} (limit {limit_s:.0f} s)\n")
        out.flush()
        proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=common.REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code: int | None = proc.wait(timeout=max(limit_s, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    seconds = time.monotonic() - start
    status = "ok" if code == 0 else ("timed out" if code is None else f"exit {code}")
    print(f"[gpu_check] {name}: {status} in {seconds:.0f} s", flush=True)
    return {"step": name, "status": status, "failed": code != 0, "seconds": round(seconds, 1),
            "limit_s": round(limit_s)}  # fmt: skip


def export_argv(args: argparse.Namespace) -> list[str]:
    """The command that saves a dense base and a gate adapter closing 30% of it (for the CLI step)."""
    argv = ["-m", "benchmarks.gpu_check", "--out-dir", str(args.out_dir), "--export", str(export_dir(args))]
    return argv + (["--smoke"] if args.smoke else [])


def export_dir(args: argparse.Namespace) -> Path:
    """Scratch folder of the CLI step's models, outside ``--out-dir`` (whose files are sent back)."""
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"peft_gates_gpu_check_{os.getpid()}"


def save_base_and_adapter(folder: Path, size: str) -> None:
    """A random Llama of ``size`` in bf16 and a ``units`` adapter whose gates close 30% of each block.

    The units closed are the benchmark's weight-norm choice (:mod:`benchmarks.inference`); speed depends on
    the widths, not on which units go. Saved like a user's run, so ``peft-gates prune`` loads them.
    """
    try:
        from benchmarks import inference
    except ImportError:
        import inference  # type: ignore[no-redef]

    base = common.load_base_model(size, "random", dtype=torch.bfloat16)
    gated = inference.gated_model(
        base, inference.importance(base), inference.closing_plan(base, TARGET_SHARE)
    )
    base.save_pretrained(folder / "dense")
    gated.save_pretrained(folder / "adapter")


@dataclass(frozen=True)
class Step:
    """One process of the run: its part, the ``python`` arguments, and the most seconds it may take."""

    name: str
    part: str
    argv: list[str]
    limit_s: float


def steps(args: argparse.Namespace, setting: Setting) -> list[Step]:
    """Every step of the parts in ``--only``, in :data:`PARTS` order."""
    out = ["--out-dir", str(args.out_dir)]
    model = ["--device", setting.device, "--size", setting.size]
    folder = export_dir(args)
    a, limit = setting.args, setting.limits_s
    methods = ",".join(("lora16", "ia3", *GATE_METHODS))
    prune = [
        "prune",
        "--base",
        str(folder / "dense"),
        "--adapter",
        str(folder / "adapter"),
        "--out",
        str(folder / "pruned"),
    ]
    bench = [
        "bench",
        "--dense",
        str(folder / "dense"),
        "--pruned",
        str(folder / "pruned"),
        "--device",
        setting.device,
        *a["cli"],
        "--json",
        str(args.out_dir / "bench_cli.json"),
        "--overwrite",
    ]
    every = [
        Step("inference", "inference",
             ["-m", "benchmarks.inference", *model, *a["inference"], "--name", "inference_gpu", *out],
             limit["inference"]),
        Step("train_cost", "train_cost",
             ["-m", "benchmarks.train_cost", *model, *a["train_cost"], "--methods", methods,
              "--name", "train_cost_gpu", *out],
             limit["train_cost"]),
        Step("export", "cli", export_argv(args), limit["cli"] / 3),
        Step("prune", "cli", ["-m", "peft_gates.cli", *prune, "--no-progress"], limit["cli"] / 3),
        Step("bench", "cli", ["-m", "peft_gates.cli", *bench, "--no-progress"], limit["cli"] / 3),
        Step("train_cost_4bit", "train_cost_4bit",
             ["-m", "benchmarks.train_cost_quantized", *model, *a["train_cost_4bit"],
              "--name", "train_cost_4bit_gpu", *out],
             limit["train_cost_4bit"]),
    ]  # fmt: skip
    return [step for step in every if step.part in args.parts]


def skip_reason(step: Step, ran: list[dict[str, Any]], left_s: float) -> tuple[str, bool] | None:
    """Why ``step`` does not run and whether that fails the run; ``None``: it runs.

    No budget left or an earlier step of its part not finished fail the run; a missing optional package
    (bitsandbytes, for the 4-bit part) does not: that part is reported unmeasured, with the fix.
    """
    if left_s < 2:
        return "budget spent", True
    if step.name in ("prune", "bench") and ran[-1]["status"] != "ok":
        return f"{ran[-1]['step']} did not finish", True
    if step.part == "train_cost_4bit" and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed: carry its wheel, see docs/benchmarks.md", False
    return None


# --------------------------------------------------------------------------------------------- targets


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def check(name: str, value: float | None, threshold: float, at_most: bool) -> dict[str, Any]:
    """One target row: the measured value against its threshold (``None`` = not measured)."""
    met = None if value is None else (value <= threshold if at_most else value >= threshold)
    return {"target": name, "measured": value, "threshold": f"{'<=' if at_most else '>='} {threshold:.2f}",
            "met": met}  # fmt: skip


def targets(out_dir: Path) -> list[dict[str, Any]]:
    """The GPU targets read back from the steps' JSON files; a missing file gives unmeasured rows."""
    rows = []
    train = _read(out_dir / "train_cost_gpu.json")
    by_method = {r["method"]: r for r in train["results"]} if train else {}
    for method in GATE_METHODS:
        row = by_method.get(method, {})
        rows.append(check(f"training step time vs LoRA r=16, {method}", row.get("step_ratio"),
                          STEP_TIME_MAX, at_most=True))  # fmt: skip
        rows.append(check(f"training peak memory vs LoRA r=16, {method}", row.get("mem_ratio"),
                          MEMORY_MAX, at_most=True))  # fmt: skip
    quantized = _read(out_dir / "train_cost_4bit_gpu.json")
    row = next((r for r in quantized["results"] if r["method"] == "gates-units"), {}) if quantized else {}
    rows.append(check("4-bit base: training step time vs QLoRA r=16, gates-units", row.get("step_ratio"),
                      STEP_TIME_MAX, at_most=True))  # fmt: skip
    rows.append(check("4-bit base: training peak memory vs QLoRA r=16, gates-units", row.get("mem_ratio"),
                      MEMORY_MAX, at_most=True))  # fmt: skip
    inference = _read(out_dir / "inference_gpu.json")
    pruned = [r for r in inference["results"] if r["multiple_of"] is not None] if inference else []
    for row in (r for r in pruned if abs(r["target"] - TARGET_SHARE) < 1e-9):
        label = f"{row['removed_block']:.1%} of block params removed, widths x{row['multiple_of']}"
        rows.append(check(f"prefill speed-up, {label}", row["prefill_speedup"], PREFILL_MIN, at_most=False))
        rows.append(check(f"decode speed-up, {label}", row.get("decode_speedup"), DECODE_MIN, at_most=False))
    for key, what in (("prefill_speedup", "prefill"), ("decode_speedup", "decode")):
        values = [r[key] for r in pruned if r.get(key) is not None]
        rows.append(check(f"slowest {what} speed-up of all pruned variants (never slower than dense)",
                          min(values) if values else None, NEVER_SLOWER, at_most=False))  # fmt: skip
    bench = _read(out_dir / "bench_cli.json")
    speed = bench["speedup"] if bench else {}
    for what in ("prefill", "decode"):
        rows.append(check(f"peft-gates bench of the saved 30% export, {what} (never slower than dense)",
                          speed.get(what), NEVER_SLOWER, at_most=False))  # fmt: skip
    for row in rows:
        row["verdict"] = {True: "met", False: "NOT met", None: "not measured"}[row["met"]]
    return rows


# --------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every step within the budget, then write and print the targets; returns gpu_check.json's data."""
    args = build_parser().parse_args(argv)
    setting = SETTINGS["smoke" if args.smoke else "gpu"]
    if args.export is not None:  # the export step, in its own process
        save_base_and_adapter(args.export, setting.size)
        return {}
    args.parts = common.parse_list(args.only)
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown or not args.parts:
        raise SystemExit(
            f"error: --only {args.only!r}: {unknown or 'nothing'} is not a part; choose from {PARTS}"
        )
    if args.budget_s <= 0:
        raise SystemExit(f"error: --budget-s {args.budget_s} must be > 0 (seconds for all steps together)")
    if setting.device == "cuda" and not torch.cuda.is_available():  # one clear line, not five failed steps
        raise SystemExit("error: torch sees no CUDA device; run this on a GPU machine, or add --smoke to "
                         "check the steps on the CPU with a tiny model")  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = args.out_dir / "gpu_check.log"
    log.write_text("")
    deadline = time.monotonic() + args.budget_s
    ran: list[dict[str, Any]] = []
    try:
        for step in steps(args, setting):
            left = deadline - time.monotonic()
            skipped = skip_reason(step, ran, left)
            if skipped is not None:
                why, failed = skipped
                ran.append({"step": step.name, "status": f"skipped ({why})", "failed": failed,
                            "seconds": 0.0, "limit_s": 0})  # fmt: skip
                print(f"[gpu_check] {step.name}: skipped ({why})", flush=True)
                continue
            ran.append(run_step(step.name, step.argv, min(step.limit_s, left), log))
    finally:
        shutil.rmtree(export_dir(args), ignore_errors=True)
    rows = targets(args.out_dir)
    payload = {"smoke": args.smoke, "setting": setting.__dict__, "steps": ran, "targets": rows}
    common.write_json(payload, "gpu_check", args.out_dir, device=setting.device)
    common.print_table(ran, [common.Column("step", "step"), common.Column("status", "status"),
                             common.Column("seconds", "seconds", "{:.0f}")], "Steps")  # fmt: skip
    common.print_table(
        rows,
        [common.Column("target", "target"), common.Column("measured", "measured", "{:.3f}x"),
         common.Column("threshold", "threshold"), common.Column("verdict", "verdict")],
        "GPU targets" + (" (SMOKE RUN on CPU: these numbers mean nothing)" if args.smoke else ""),
    )  # fmt: skip
    print(f"wrote {args.out_dir / 'gpu_check.json'} (log: {log})")
    if any(step["failed"] for step in ran):
        raise SystemExit(1)
    return payload


if __name__ == "__main__":
    raise SystemExit(common.cli(main))
