"""``peft-gates``: the command line for what comes after training: prune, report, benchmark.

Subcommands:

* ``prune``: base model + trained gate adapter -> a smaller model on disk (per-layer or zero-padded layout),
  with its compression report;
* ``report``: the compression table and plot of an adapter (with its base) or of a pruned export;
* ``bench``: prefill latency and decode throughput of a dense and a pruned model (:mod:`peft_gates.latency`).

Exit codes: 0 success; 2 bad arguments (argparse); 1 a user error (a missing path, an adapter that does not
fit its base, a non-empty output directory, ...), reported as one ``error: ...`` line on stderr without a
traceback (``--debug`` shows it). Heavy imports (torch, transformers, peft) happen inside the subcommands,
so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

PROG = "peft-gates"

DESCRIPTION = """\
Prune, inspect and benchmark FineGates models (peft_gates).

A gate adapter (trained with peft.get_peft_model(model, peft_gates.GateConfig(...)) and saved with
save_pretrained) holds one trainable gate per row/column or per removable unit of a frozen base model.
`prune` folds the gates into the base weights and cuts the closed MLP neurons and attention heads out, so
the result is a smaller plain transformers model; `report` shows what was (or would be) removed per layer;
`bench` times the dense and the pruned model.
"""

EPILOG = """\
examples:
  peft-gates prune --base ./SmolLM2-135M-Instruct --adapter ./gates-adapter --out ./pruned
  peft-gates prune --base ./base --adapter ./adapter --out ./pruned-stock --layout zero_pad --multiple-of 64
  peft-gates report ./gates-adapter --base ./SmolLM2-135M-Instruct     # what the merge would remove
  peft-gates report ./pruned                                            # what an export removed
  peft-gates bench --dense ./SmolLM2-135M-Instruct --pruned ./pruned --batch 8 --seq 256 --new-tokens 32

Paths are local directories (download hub models first, e.g. `hf download ORG/NAME --local-dir DIR`).
A per_layer export loads with AutoModelForCausalLM.from_pretrained(DIR) after `import peft_gates`; a
zero_pad export loads with stock transformers alone. Run `peft-gates COMMAND --help` for each command.
"""

PRUNE_DESCRIPTION = """\
Fold a trained gate adapter into its base model and cut the closed units out.

Loads the base with the Auto class of the adapter's task type (AutoModelForCausalLM for CAUSAL_LM,
AutoModelForSequenceClassification for SEQ_CLS, ...; the base's own architecture when the adapter has no
task type), applies the adapter with PeftModel.from_pretrained, runs the pruning merge
(merge_and_unload: gates folded exactly, closed MLP neurons and attention heads / KV groups removed, kept
MLP widths rounded up to --multiple-of) and saves the result with peft_gates.save_pruned, together with the
tokenizer (from the adapter directory, else the base) and compression_report.{json,md,png}.
"""

PRUNE_EPILOG = """\
examples:
  peft-gates prune --base ./base --adapter ./adapter --out ./pruned
  peft-gates prune --base ./base --adapter ./adapter --out ./pruned --multiple-of 1 --overwrite
  peft-gates prune --base ./base --adapter ./adapter --out ./stock --layout zero_pad --dtype bfloat16

layouts:
  per_layer  every block keeps its own widths (smallest, fastest); reloads with the Auto classes after
             `import peft_gates` (config model_type "<family>_pruned").
  zero_pad   every block is zero-padded to the widest kept block under a stock config: loads with plain
             transformers and servers that need one width per model; exact, but saves only what the
             widest block lost.
"""

REPORT_DESCRIPTION = """\
Show how much of a model the gates remove, per layer: kept MLP neurons and attention heads, parameters and
FLOPs per token before/after, and closed rows/columns that stay as zeros because they are not removable units.

PATH is either
  * a gate adapter directory (adapter_config.json; needs --base): the plan of the merge it would get, or
  * a pruned export written by `peft-gates prune` / peft_gates.save_pruned: its compression_report.json,
    or, when the export has none, the per-layer widths recorded in its config.json.
Prints the table; with --out DIR it also writes compression_report.{json,md,png} into DIR. Without --out
nothing is written, so the adapter or export it reads is never changed.
"""

REPORT_EPILOG = """\
examples:
  peft-gates report ./adapter --base ./base                  # plan with kept widths rounded up to 128
  peft-gates report ./adapter --base ./base --multiple-of 1  # the exact closed-unit counts
  peft-gates report ./pruned --out ./report                  # an export's report, also written to ./report
"""

BENCH_DESCRIPTION = """\
Time a dense and a pruned model the same way (peft_gates.latency): prefill = one forward over
--batch x --seq random tokens without a cache; decode = --new-tokens greedy steps with the KV cache after
a --batch x --seq prompt (tokens/s = batch x new tokens / time). Untimed warm-up runs, then the median of
--repeats timed runs; the device is synchronized around every timed region. Encoders get prefill only.
Both models are loaded together and timed in --rounds rounds, in a rotating order (dense first, then pruned
first, ...); each keeps its fastest round, so a burst of background load cannot favour one side of the ratio.

Numbers depend on the machine and its load: compare models only within one run. On GPUs, odd widths can
make a pruned model slower than the dense one (prune with the default --multiple-of 128).
"""

BENCH_EPILOG = """\
examples:
  peft-gates bench --dense ./base --pruned ./pruned
  peft-gates bench --dense ./base --pruned ./pruned --device cuda --batch 8 --seq 512 --new-tokens 64
  peft-gates bench --dense ./base --pruned ./pruned --json latency.json --repeats 10
"""

#: PEFT task type -> transformers Auto class that builds the model the adapter was trained on.
TASK_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}

#: Architecture-name suffix -> Auto class (for checkpoints whose class is a peft_gates twin or unknown).
_ARCH_SUFFIX_AUTO_CLASSES = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
)

#: Final layers of classification heads (PEFT saves them as modules_to_save); their rows are the labels.
_HEAD_WEIGHTS = ("classifier.weight", "classifier.out_proj.weight", "score.weight", "qa_outputs.weight")

DTYPES = ("auto", "float32", "bfloat16", "float16")


class CliError(Exception):
    """A user error: reported as one ``error: ...`` line on stderr with exit code 1, no traceback."""


# --------------------------------------------------------------------------------------------- arguments


def positive_int(text: str) -> int:
    """argparse type for sizes, steps and repeats (also used by the examples and benchmarks)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer: use an integer >= 1")
    return value


def non_negative_int(text: str) -> int:
    """argparse type for warm-up counts (0 = none)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not a non-negative integer: use an integer >= 0")
    return value


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the hand-wrapped description/epilog and shows defaults where an option has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The ``peft-gates`` argument parser (exposed for tests and for generating docs)."""
    from . import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="show library logs and warnings")
    common.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")

    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    prune = sub.add_parser(
        "prune",
        parents=[common],
        help="fold a gate adapter into its base and cut closed units out",
        description=PRUNE_DESCRIPTION,
        epilog=PRUNE_EPILOG,
        formatter_class=_Formatter,
    )
    prune.add_argument("--base", required=True, metavar="PATH", help="base model directory")
    prune.add_argument(
        "--adapter", required=True, metavar="PATH", help="gate adapter directory (adapter_config.json)"
    )
    prune.add_argument("--out", required=True, metavar="PATH", help="directory for the pruned model")
    _add_plan_options(prune)
    prune.add_argument(
        "--layout", choices=("per_layer", "zero_pad"), default="per_layer", help="export layout (see below)"
    )
    prune.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="dtype to load the base in and save the pruned model in; auto = the checkpoint's",
    )
    prune.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    prune.set_defaults(func=cmd_prune, subparser=prune)

    report = sub.add_parser(
        "report",
        parents=[common],
        help="per-layer table and plot of what the merge removes",
        description=REPORT_DESCRIPTION,
        epilog=REPORT_EPILOG,
        formatter_class=_Formatter,
    )
    report.add_argument("path", metavar="PATH", help="gate adapter directory or pruned export directory")
    report.add_argument("--base", metavar="PATH", help="base model directory (needed for an adapter)")
    report.add_argument(
        "--out", metavar="PATH", help="also write compression_report.{json,md,png} there (default: none)"
    )
    _add_plan_options(report, for_report=True)
    report.set_defaults(func=cmd_report, subparser=report)

    bench = sub.add_parser(
        "bench",
        parents=[common],
        help="prefill latency and decode throughput, dense vs pruned",
        description=BENCH_DESCRIPTION,
        epilog=BENCH_EPILOG,
        formatter_class=_Formatter,
    )
    bench.add_argument("--dense", required=True, metavar="PATH", help="dense (unpruned) model directory")
    bench.add_argument("--pruned", required=True, metavar="PATH", help="pruned model directory")
    bench.add_argument("--batch", metavar="N", type=positive_int, default=1, help="sequences per forward")
    bench.add_argument(
        "--seq", metavar="N", type=positive_int, default=128, help="prefill / prompt length in tokens"
    )
    bench.add_argument(
        "--new-tokens",
        metavar="N",
        type=non_negative_int,
        default=32,
        help="timed decode steps (0: prefill only)",
    )
    bench.add_argument(
        "--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N"
    )
    bench.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="auto = bfloat16 on GPUs, float32 on CPU"
    )
    bench.add_argument(
        "--repeats", metavar="N", type=positive_int, default=5, help="timed runs (the median is shown)"
    )
    bench.add_argument(
        "--warmup", metavar="N", type=non_negative_int, default=2, help="untimed runs before timing"
    )
    bench.add_argument(
        "--rounds",
        metavar="N",
        type=positive_int,
        default=3,
        help="rounds of timing, models in a rotating order; the fastest round is shown",
    )
    bench.add_argument(
        "--threads", metavar="N", type=positive_int, help="torch CPU threads (default: torch's choice)"
    )
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    bench.add_argument("--overwrite", action="store_true", help="replace an existing --json FILE")
    bench.set_defaults(func=cmd_bench, subparser=bench)
    return parser


def _add_plan_options(parser: argparse.ArgumentParser, for_report: bool = False) -> None:
    suffix = " (adapters only)" if for_report else ""
    parser.add_argument(
        "--multiple-of",
        metavar="N",
        type=positive_int,
        default=None if for_report else 128,
        help="round each block's kept MLP width up to a multiple of this; 1 = exact widths"
        + (suffix + "; default 128" if for_report else ""),
    )
    parser.add_argument(
        "--min-units",
        metavar="N",
        type=positive_int,
        default=None if for_report else 1,
        help="keep at least this many attention units and MLP neurons per block"
        + (suffix + "; default 1" if for_report else ""),
    )
    if for_report:
        parser.add_argument(
            "--seq-len",
            metavar="N",
            type=non_negative_int,
            default=None,
            help="context length for the attention FLOPs per token (adapters only; default 0: left out)",
        )


# --------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``peft-gates`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        with _quiet_libraries(args.verbose, progress=_progress(args)):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (CliError, OSError, ValueError, TypeError) as err:
        if args.debug or (isinstance(err, TypeError) and not _written_for_users(err)):
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 1


def _written_for_users(err: TypeError) -> bool:
    """A TypeError whose message names the fix (an unsupported quantized base), unlike a bug's."""
    from .quantization import UnsupportedQuantizationError

    return isinstance(err, UnsupportedQuantizationError)


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    return " ".join(text.split())


@contextlib.contextmanager
def _quiet_libraries(verbose: bool, progress: bool) -> Iterator[None]:
    """Keep the terminal for our output while a command runs; everything is restored afterwards.

    Without ``--verbose``: transformers logs only errors, deprecation chatter is hidden, and our own
    warnings (e.g. an architecture the merge cannot cut) print as one ``warning:`` line. transformers'
    own progress bars (loading, saving) follow ours: on only on an interactive terminal.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        if not verbose:
            hf_logging.set_verbosity_error()
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.showwarning = _show_warning
        if not progress:
            hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()


def _show_warning(
    message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars on an interactive terminal unless --no-progress."""
    return not args.no_progress and sys.stderr.isatty()


# --------------------------------------------------------------------------------------------- loading


def _existing_dir(path: str | os.PathLike, flag: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CliError(
            f"{flag} {path}: no such directory (peft-gates reads local checkpoints; download hub models "
            "first, e.g. `hf download ORG/NAME --local-dir DIR`)"
        )
    if not p.is_dir():
        raise CliError(f"{flag} {path} is a file, not a model directory")
    return p


def _is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def _read_adapter_config(adapter: Path, flag: str = "--adapter") -> dict[str, Any]:
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise CliError(
            f"{flag} {adapter} has no adapter_config.json: not a PEFT adapter directory (write one with "
            "model.save_pretrained(DIR) or trainer.save_model(DIR))"
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CliError(f"{config_file} is not valid JSON ({err})") from None
    peft_type = str(config.get("peft_type"))
    if peft_type != "PEFT_GATES":
        raise CliError(
            f"{flag} {adapter} is a {peft_type} adapter, not a peft_gates one (peft_type PEFT_GATES); merge "
            "it with PEFT's own merge_and_unload()"
        )
    if not any((adapter / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise CliError(
            f"{flag} {adapter} has adapter_config.json but no adapter_model.safetensors (the gate values): "
            "an incomplete copy; pass the whole directory that model.save_pretrained(DIR) wrote"
        )
    return config


def _read_model_config(path: Path, flag: str) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CliError(f"{flag} {path} has no config.json: not a transformers model directory")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CliError(f"{config_file} is not valid JSON ({err})") from None


def _auto_class_name(architectures: Sequence[str] | None) -> str:
    """The Auto class that rebuilds a checkpoint whose ``config.architectures`` is ``architectures``."""
    name = (architectures or [""])[0] or ""
    for suffix, auto in _ARCH_SUFFIX_AUTO_CLASSES:
        if name.endswith(suffix):
            return auto
    return "AutoModel"


def _torch_dtype(name: str) -> Any:
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _num_labels(adapter: Path) -> int | None:
    """Label count of a classification head saved in the adapter (modules_to_save), read from its shape."""
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            if key.endswith(_HEAD_WEIGHTS):
                return int(f.get_slice(key).get_shape()[0])
    return None


def load_base_for_adapter(base: Path, adapter: Path, adapter_config: dict[str, Any], dtype: str) -> Any:
    """The base, built with the Auto class of the adapter's task type (label count read from the adapter)."""
    import transformers

    task = adapter_config.get("task_type")
    if task:
        class_name = TASK_AUTO_CLASSES.get(str(task))
        if class_name is None:
            raise CliError(
                f"adapter task_type {task!r} is not supported (known: {sorted(TASK_AUTO_CLASSES)})"
            )
    else:
        class_name = _auto_class_name(_read_model_config(base, "--base").get("architectures"))
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype)}
    if class_name in ("AutoModelForSequenceClassification", "AutoModelForTokenClassification"):
        labels = _num_labels(adapter)
        if labels is not None:
            kwargs["num_labels"] = labels
    try:
        return getattr(transformers, class_name).from_pretrained(str(base), **kwargs)
    except (OSError, ValueError) as err:
        raise CliError(f"cannot load --base {base} with {class_name}: {_one_line(err)}") from err


def load_gated(base_model: Any, adapter: Path, base: Path) -> Any:
    """``PeftModel.from_pretrained(base_model, adapter)`` with a clear message when they do not fit."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base_model, str(adapter))
    except RuntimeError as err:
        text = str(err)
        if "size mismatch" not in text:
            raise
        raise CliError(_mismatch_message(text, adapter, base)) from err
    except ValueError as err:  # PEFT: no target module found; peft_gates: units of another family
        raise CliError(
            f"--adapter {adapter} does not fit --base {base} (trained on another model?): {_one_line(err)}"
        ) from err


def _mismatch_message(text: str, adapter: Path, base: Path) -> str:
    count = text.count("size mismatch for")
    match = re.search(
        r"size mismatch for (\S+?): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
        r"the shape in current model is torch\.Size\((\[[^\]]*\])\)",
        text,
    )
    detail = ""
    if match:
        key = match.group(1).removeprefix("base_model.model.").removesuffix(".default")
        detail = f": {key} has shape {match.group(2)} in the adapter but {match.group(3)} in the base"
        if count > 1:
            detail += f" ({count - 1} more mismatches)"
    return (
        f"--adapter {adapter} does not fit --base {base} (size mismatch{detail}); pass the base model "
        "the adapter was trained on"
    )


def _load_tokenizer(*dirs: Path) -> tuple[Any, Path | None]:
    """The tokenizer of the first directory that has one (adapter first: trainers save it there)."""
    from transformers import AutoTokenizer

    for d in dirs:
        if any((d / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
            try:
                return AutoTokenizer.from_pretrained(str(d)), d
            except (OSError, ValueError):
                continue
    return None, None


def _check_out(out: Path, overwrite: bool, inputs: dict[str, Path]) -> None:
    """Refuse an ``--out`` that is a file, holds files (without ``--overwrite``) or holds an input."""
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CliError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    target = out.resolve()
    for flag, path in inputs.items():
        if target == path.resolve() or target in path.resolve().parents:
            raise CliError(
                f"--out {out} is or contains {flag} {path}: writing the export there would delete what it is "
                "built from; pass another --out"
            )


# --------------------------------------------------------------------------------------------- prune


def cmd_prune(args: argparse.Namespace) -> int:
    """``peft-gates prune``: base + adapter -> pruned export with its report."""
    base = _existing_dir(args.base, "--base")
    adapter = _existing_dir(args.adapter, "--adapter")
    adapter_config = _read_adapter_config(adapter)
    _read_model_config(base, "--base")
    out = Path(args.out).expanduser()
    _check_out(out, args.overwrite, {"--base": base, "--adapter": adapter})

    import peft_gates

    print(f"loading base {base} (dtype {args.dtype})")
    base_model = load_base_for_adapter(base, adapter, adapter_config, args.dtype)
    print(f"loading gate adapter {adapter} (placement {adapter_config.get('placement')!r})")
    model = load_gated(base_model, adapter, base).eval()
    plan = peft_gates.plan_pruning(model, multiple_of=args.multiple_of, min_units=args.min_units)
    print(peft_gates.gate_statistics(model, with_plan=False).summary())
    tokenizer, tokenizer_dir = _load_tokenizer(adapter, base)
    dtype = None if args.dtype == "auto" else _torch_dtype(args.dtype)
    pruned = model.merge_and_unload(
        progressbar=_progress(args), multiple_of=args.multiple_of, min_units=args.min_units, dtype=dtype
    )
    saved = peft_gates.save_pruned(
        pruned, out, tokenizer=tokenizer, layout=args.layout, overwrite=args.overwrite, report=plan
    )
    before, after = plan.params_total_before, plan.params_total_after
    removed = (before - after) / before if before else 0.0
    print(
        f"saved the pruned model to {saved} (layout {args.layout}): {before:,} -> {after:,} parameters "
        f"({removed:.1%} removed; kept MLP widths rounded up to multiples of {args.multiple_of})"
    )
    if not plan.supported:
        print(f"  note: {plan.model_type} has no architecture entry: gates were folded, nothing was cut out")
    if args.layout == "zero_pad":
        print("  zero_pad: every block padded to the widest kept block, so the files hold more than that")
    print(f"  report: {saved / 'compression_report.md'} (.json, .png beside it)")
    found = f"from {tokenizer_dir}" if tokenizer is not None else "none found in --adapter or --base"
    print(f"  tokenizer: {found}")
    auto = _auto_class_name(getattr(pruned.config, "architectures", None))
    prefix = "" if args.layout == "zero_pad" else "import peft_gates; "
    print(f'  load it with: {prefix}transformers.{auto}.from_pretrained("{saved}")')
    return 0


# --------------------------------------------------------------------------------------------- report


def plan_from_report(data: dict[str, Any]) -> Any:
    """Rebuild a :class:`~peft_gates.pruning.PrunePlan` from a ``compression_report.json``.

    The JSON holds counts, not the kept indices; the rebuilt plan uses the leading indices, which gives
    the same tables, totals and plot (none of them depends on which neurons were kept).
    """
    from dataclasses import fields

    from .pruning import LayerPlan, PrunePlan

    layer_fields = {f.name for f in fields(LayerPlan)} - {"kept_neurons", "kept_units"}
    try:
        layers = [
            LayerPlan(
                **{k: entry[k] for k in layer_fields if k in entry},
                kept_neurons=list(range(entry["kept_intermediate_size"])),
                kept_units=list(range(entry["kept_kv_heads"])),
            )
            for entry in data["layers"]
        ]
        return PrunePlan(
            model_type=data["model_type"],
            adapter_names=list(data["adapter_names"]),
            multiple_of=data["multiple_of"],
            min_units=data["min_units"],
            seq_len=data["seq_len"],
            supported=data["supported"],
            num_heads=data["num_heads"],
            num_kv_heads=data["num_kv_heads"],
            layers=layers,
            params_total_before=data["totals"]["params_model_before"],
            other_zeroed=data.get("other_zeroed", {}),
        )
    except (KeyError, TypeError) as err:
        raise CliError(
            f"compression_report.json lacks field {err} (written by another peft_gates version?)"
        ) from None


def cmd_report(args: argparse.Namespace) -> int:
    """``peft-gates report``: the compression table and plot of an adapter or an export."""
    path = _existing_dir(args.path, "PATH")
    out = Path(args.out).expanduser() if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file; pass a directory")
    if _is_adapter_dir(path):
        return _report_adapter(args, path, out)
    given = [flag for flag, value in (("--base", args.base), ("--multiple-of", args.multiple_of),
             ("--min-units", args.min_units), ("--seq-len", args.seq_len)) if value is not None]  # fmt: skip
    if given:
        args.subparser.error(
            f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to an adapter directory; "
            f"{path} is a pruned export, whose "
            "report records the settings it was pruned with"
        )
    return _report_export(path, out)


def _report_adapter(args: argparse.Namespace, adapter: Path, out: Path | None) -> int:
    if args.base is None:
        args.subparser.error(f"{adapter} is a gate adapter: pass --base PATH, the model it was trained on")
    base = _existing_dir(args.base, "--base")
    adapter_config = _read_adapter_config(adapter, "PATH")
    import peft_gates
    from peft_gates.report import report_markdown

    model = load_gated(load_base_for_adapter(base, adapter, adapter_config, "auto"), adapter, base)
    plan = peft_gates.plan_pruning(
        model,
        multiple_of=args.multiple_of if args.multiple_of is not None else 128,
        min_units=args.min_units if args.min_units is not None else 1,
        seq_len=args.seq_len if args.seq_len is not None else 0,
    )
    print(peft_gates.gate_statistics(model, with_plan=False).summary())
    print()
    print(report_markdown(plan), end="")
    _write_report(plan, out)
    return 0


def _report_export(export: Path, out: Path | None) -> int:
    report_file = export / "compression_report.json"
    if report_file.is_file():
        from .report import report_markdown

        try:
            plan = plan_from_report(json.loads(report_file.read_text()))
        except json.JSONDecodeError as err:
            raise CliError(f"{report_file} is not valid JSON ({err})") from None
        print(report_markdown(plan), end="")
        _write_report(plan, out)
        return 0
    config = _read_model_config(export, "PATH")
    widths = config.get("pruned_layers")
    if not widths:
        raise CliError(
            f"{export} has neither compression_report.json nor per-layer widths (pruned_layers) in its "
            "config.json: not a peft_gates export, or a zero_pad export saved without report= (pass the "
            "adapter and --base instead)"
        )
    _report_widths(export, config, widths, out)
    return 0


def _write_report(plan: Any, out: Path | None) -> None:
    from .report import REPORT_STEM, write_report

    if out is None:
        print(f"\n(pass --out DIR to also write DIR/{REPORT_STEM}.{{json,md,png}})")
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = write_report(plan, out)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    names = ",".join(p.suffix.lstrip(".") for p in paths)
    print(f"\nwrote {out / REPORT_STEM}.{{{names}}}")


def _report_widths(
    export: Path, config: dict[str, Any], widths: list[dict[str, int]], out: Path | None
) -> None:
    """Table (and plot) of the per-layer widths recorded in a per-layer export's config.json."""
    from types import SimpleNamespace

    from .architectures import arch_spec, attention_shape
    from .export import write_file
    from .pruning import LayerPlan, PrunePlan
    from .report import REPORT_STEM, plot_kept_fraction

    model_type = str(config.get("model_type", "?")).removesuffix("_pruned")
    spec = arch_spec(model_type)
    if spec is None:
        raise CliError(f"{export}: model_type {model_type!r} is not a family peft_gates knows")
    shape = attention_shape(spec, SimpleNamespace(**config))
    intermediate = config.get(spec.intermediate_attr) or 4 * config[spec.hidden_attr]
    print(f"# Kept widths ({model_type}, from {export / 'config.json'}; no compression_report.json)\n")
    print("| layer | neurons kept | heads kept (kv) |\n|---|---|---|")
    layers = []
    for i, w in enumerate(widths):
        print(
            f"| {i} | {w['intermediate_size']} of {intermediate} | {w['num_attention_heads']} "
            f"({w['num_key_value_heads']}) of {shape.num_heads} ({shape.num_kv_heads}) |"
        )
        layers.append(
            LayerPlan(
                index=i,
                intermediate_size=intermediate,
                kept_neurons=list(range(w["intermediate_size"])),
                closed_neurons=0,
                num_units=shape.num_units,
                kept_units=list(range(w["num_key_value_heads"])),
                closed_units=0,
                heads_per_unit=shape.heads_per_unit,
                head_dim=shape.head_dim,
                params_before=0,
                params_after=0,
                flops_before=0,
                flops_after=0,
            )  # fmt: skip
        )
    if out is None:
        print(f"\n(pass --out DIR to also write the plot of these widths to DIR/{REPORT_STEM}.png)")
        return
    out.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            "warning: matplotlib is not installed: no plot (pip install 'peft-gates[report]')",
            file=sys.stderr,
        )
        return
    plan = PrunePlan(
        model_type=model_type, adapter_names=[], multiple_of=0, min_units=1, seq_len=0, supported=True,
        num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads, layers=layers, params_total_before=0,
    )  # fmt: skip
    png = write_file(out / f"{REPORT_STEM}.png", lambda tmp: plot_kept_fraction(plan, tmp))
    print(f"\nwrote {png}")


# --------------------------------------------------------------------------------------------- bench


def _resolve_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CliError(f"--device {name!r} is not a device ({_one_line(err)})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name}: torch sees no CUDA device here")
    return device


def load_for_inference(path: Path, flag: str, dtype: Any, device: Any) -> Any:
    """A saved model (stock, per-layer pruned or zero-padded) with the Auto class of its architecture."""
    import transformers

    import peft_gates  # noqa: F401 - registers the per-layer pruned architectures

    config = _read_model_config(path, flag)
    if _is_adapter_dir(path):
        raise CliError(f"{flag} {path} is a gate adapter; bench needs a model: run `peft-gates prune` first")
    class_name = _auto_class_name(config.get("architectures"))
    try:
        model = getattr(transformers, class_name).from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError) as err:
        raise CliError(f"cannot load {flag} {path} with {class_name}: {_one_line(err)}") from err
    return model.to(device).eval()


def cmd_bench(args: argparse.Namespace) -> int:
    """``peft-gates bench``: time the dense and the pruned model the same way; print a table."""
    dense_dir = _existing_dir(args.dense, "--dense")
    pruned_dir = _existing_dir(args.pruned, "--pruned")
    for flag, path in (("--dense", dense_dir), ("--pruned", pruned_dir)):
        _read_model_config(path, flag)
    json_path = Path(args.json).expanduser() if args.json else None
    if json_path is not None and json_path.is_dir():
        raise CliError(f"--json {json_path} is a directory; pass a file name")
    if json_path is not None and json_path.exists() and not args.overwrite:
        raise CliError(f"--json {json_path} exists; pass --overwrite to replace it, or another file name")

    import torch
    from tqdm.auto import tqdm

    from .export import write_file
    from .latency import compare_latency, speedups

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    dtype = (
        (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if args.dtype == "auto"
        else getattr(torch, args.dtype)
    )
    models = {
        "dense": load_for_inference(dense_dir, "--dense", dtype, device),
        "pruned": load_for_inference(pruned_dir, "--pruned", dtype, device),
    }
    with tqdm(total=args.rounds, desc="timing rounds", disable=not _progress(args), leave=False) as bar:
        results = compare_latency(
            models,
            batch=args.batch,
            seq_len=args.seq,
            new_tokens=args.new_tokens,
            rounds=args.rounds,
            repeats=args.repeats,
            warmup=args.warmup,
            decode=args.new_tokens > 0,
            on_round=bar.update,
        )
    speed = speedups(results["dense"], results["pruned"])
    print(_bench_table(results, speed, args, device, dtype))
    if json_path is not None:
        payload = {
            "dense_path": str(dense_dir),
            "pruned_path": str(pruned_dir),
            "results": {name: r.to_dict() for name, r in results.items()},
            "speedup": speed,
        }
        json_path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(payload, indent=2) + "\n"
        write_file(json_path, lambda tmp: tmp.write_text(text))
        print(f"wrote {json_path}")
    return 0


def _bench_table(
    results: dict[str, Any], speed: dict[str, Any], args: argparse.Namespace, device: Any, dtype: Any
) -> str:
    from .latency import speedup_text

    dense = results["dense"]
    decode = dense.decode is not None
    title = (
        f"latency on {device} ({str(dtype).removeprefix('torch.')}): prefill {args.batch} x {args.seq} tokens"
        + (f", decode {args.new_tokens} tokens at batch {args.batch} with KV cache" if decode else "")
        + f"; median of {args.repeats} runs after {args.warmup} warm-up"
        + f", best of {args.rounds} rotating rounds"
    )
    header = ["model", "parameters", "prefill ms", "prefill tok/s"]
    if decode:
        header += ["decode ms/step", "decode tok/s"]
    rows = []
    for name, r in results.items():
        params = f"{r.parameters:,}"
        if name != "dense" and dense.parameters:
            params += f" ({r.parameters / dense.parameters - 1:+.1%})"
        row = [name, params, f"{r.prefill_ms:.2f}", f"{r.prefill_tokens_per_s:,.0f}"]
        if decode:
            row += (
                [f"{r.decode_ms_per_step:.2f}", f"{r.decode_tokens_per_s:,.1f}"]
                if r.decode is not None
                else ["-", "-"]
            )
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = [title, ""]
    for row in (header, *rows):
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
    summary = (
        f"\nspeedup of pruned over dense: prefill {speedup_text(speed['prefill'], speed['prefill_rounds'])}"
    )
    if speed["decode"] is not None:
        summary += f", decode {speedup_text(speed['decode'], speed['decode_rounds'])}"
    notes = [
        r.decode_skipped for r in results.values() if r.decode_skipped and r.decode_skipped != "not requested"
    ]
    if notes:
        summary += f"\n(decode not timed: {notes[0]})"
    return "\n".join(lines) + summary


if __name__ == "__main__":  # python -m peft_gates.cli
    sys.exit(main())
