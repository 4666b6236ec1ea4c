"""Helpers shared by the benchmark scripts: memory, JSON results, tables, plots, tiny stand-ins.

Everything a benchmark needs more than once lives here, so the scripts contain only their experiment.
Timing is not here: it is :mod:`peft_gates.latency` (warm-up, synchronized repeats, median), the procedure
of ``peft-gates bench``, so the benchmarks and the command line measure alike.
Numbers go to ``benchmarks/results/<name>.json`` together with the environment they were measured in
(versions, device, CPU load, git commit), because a timing without its machine and load is not a result.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
WORKER_MARK = "@@BENCHMARK_RESULT@@"

Pair = tuple[str, int]


# --------------------------------------------------------------------------------------------- errors


class MissingDependency(RuntimeError):
    """A model, data or plotting package is missing; the message names what to install."""


def require(module: str, install: str | None = None) -> Any:
    """Import ``module`` or fail with the pip command that installs it (not a bare ImportError)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependency(
            f"this benchmark needs the Python package {module!r}: pip install {install or module}"
        ) from err


def load_asset(loader: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a loader of :mod:`peft_gates.assets`; "not installed / cannot fetch" becomes MissingDependency.

    The loaders already name the package to install in their messages; this only gives those errors one
    type, so ``main()`` can report them in one line instead of a traceback.
    """
    try:
        return loader(*args, **kwargs)
    except MissingDependency:
        raise
    except ImportError as err:
        name = getattr(err, "name", None) or str(err)
        raise MissingDependency(f"{err} (install the missing package: pip install {name})") from err
    except RuntimeError as err:
        if "pip " in str(err):
            raise MissingDependency(str(err)) from err
        raise


def cli(main: Callable[[Sequence[str] | None], Any]) -> int:
    """Run a script's ``main`` for ``__main__``: a missing package is one line on stderr and exit code 2."""
    try:
        main(None)
    except MissingDependency as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------------------------- arguments


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except empty ones (None, False) whose meaning the help text already states."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "", argparse.SUPPRESS) or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options every script has: where results go, CPU threads, plots on/off."""
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where JSON and PNG results go (default: %(default)s)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0 = torch's default, usually one per core)"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--size``, ``--weights``, ``--device`` of the speed benchmarks, as :func:`load_base_model` reads them.

    One definition, so that a size means the same model in the inference and both train-cost scripts.
    """
    parser.add_argument(
        "--size",
        choices=("135m", "1b", "tiny"),
        default="135m",
        help="135m = SmolLM2-135M, 1b = Llama-3.2-1B shape (config), tiny = 2-layer random Llama",
    )
    parser.add_argument(
        "--weights",
        choices=("real", "random"),
        default="real",
        help="real = SmolLM2-135M-Instruct weights (135m only); random = built from the config",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")


def setup_run(args: argparse.Namespace) -> None:
    """Apply the common options (threads) and create the output folder."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)


def parse_list(text: str, cast: Callable[[str], Any] = str) -> list[Any]:
    """``"a,b,c"`` -> ``[a, b, c]`` with ``cast`` applied; empty items are dropped."""
    return [cast(item.strip()) for item in text.split(",") if item.strip()]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda given but torch sees no CUDA device")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``--dtype``: ``auto`` is float32 on CPU and bfloat16 on CUDA (how each is usually run), else named."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (head init, gate init, gate noise, data order all draw from them)."""
    from transformers import set_seed

    random.seed(seed)
    set_seed(seed)


# --------------------------------------------------------------------------------------------- environment


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions, hardware, CPU load and git state: what a reader needs to judge (or redo) a measurement."""
    import peft
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        pass
    if device is not None:
        device = torch.device(device)
        info["device"] = str(device)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
    return info


# --------------------------------------------------------------------------------------------- results


def _to_jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    if isinstance(value, set | tuple):
        return list(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _finite(value: Any) -> Any:
    """NaN/inf become None: strict JSON has no NaN and a reader should see "not measured", not a number."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_json(
    payload: dict[str, Any], name: str, out_dir: Path | str = RESULTS_DIR, device: Any = None
) -> Path:
    """Write ``payload`` and a ``meta`` block (environment, argv, time) to ``out_dir/name.json`` (atomic)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        **environment(device),
    }
    data = json.loads(json.dumps({"meta": meta, **payload}, default=_to_jsonable))
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Column:
    """One table column: the row key, its header and a format spec (``"{:.1%}"``)."""

    key: str
    header: str
    fmt: str = "{}"


def format_table(rows: Iterable[dict[str, Any]], columns: Sequence[Column], title: str | None = None) -> str:
    """A Markdown table (pastes into issues and docs as is); missing or NaN cells print as ``-``."""

    def cell(row: dict[str, Any], col: Column) -> str:
        value = row.get(col.key)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "-"
        try:
            return col.fmt.format(value)
        except (ValueError, TypeError):
            return str(value)

    body = [[cell(row, c) for c in columns] for row in rows]
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(c.header for c in columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def print_table(rows: Iterable[dict[str, Any]], columns: Sequence[Column], title: str | None = None) -> str:
    """Print :func:`format_table` and return it."""
    text = format_table(rows, columns, title)
    print("\n" + text + "\n", flush=True)
    return text


# --------------------------------------------------------------------------------------------- statistics


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std (0 for one value), min, max and n, ignoring NaN/None (a failed seed is not a zero)."""
    clean = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not clean:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {
        "mean": statistics.fmean(clean),
        "std": statistics.stdev(clean) if len(clean) > 1 else 0.0,
        "min": min(clean),
        "max": max(clean),
        "n": len(clean),
    }


def count_parameters(model: torch.nn.Module, trainable: bool = False) -> int:
    """Parameters (shared ones once), or only the trained ones.

    ``trainable`` skips PEFT's ``original_module`` copies next to ``modules_to_save`` wrappers: a
    ``bias="all"`` adapter marks their biases trainable although they never run, so no step updates them.
    """
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or (trainable and (not p.requires_grad or ".original_module." in name)):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


# --------------------------------------------------------------------------------------------- memory


def rss_mib() -> float:
    """Resident set size of this process now, in MiB (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    """High-water RSS of this process since it started, in MiB (``getrusage``; KiB on Linux, bytes on macOS).

    Not torch-aware and not resettable: it includes the interpreter, libraries and weights. Measure one
    method per fresh process (:func:`run_worker`) and subtract :func:`rss_mib` taken after loading.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class RssSampler:
    """Highest RSS seen by a 2 ms polling thread: a CPU peak for one window, which ``getrusage`` cannot give.

    Use: ``with RssSampler() as s: work()`` then ``s.peak`` (MiB). Peaks shorter than the interval can be
    missed; activations live through a whole backward pass, far longer.
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib())
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = rss_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def reset_cuda_peak(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_mib(device: torch.device | str) -> float | None:
    """``torch.cuda.max_memory_allocated`` in MiB (tensors only, not the caching allocator's reserve)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


# --------------------------------------------------------------------------------------------- subprocess


def emit_worker_result(payload: dict[str, Any]) -> None:
    """A worker's one result line on stdout (everything else it prints is ignored)."""
    print(WORKER_MARK + json.dumps(payload, default=_to_jsonable), flush=True)


def serve_worker(
    args: argparse.Namespace, measure: Callable[[argparse.Namespace], dict[str, Any]]
) -> dict[str, Any]:
    """The ``--worker`` side of :func:`run_worker`: apply ``--threads``, measure, emit the result, return it.

    Every script that measures in subprocesses ends its ``--worker`` branch this way; here the protocol
    with :func:`run_worker` (one marked result line on stdout) is written once.
    """
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = measure(args)
    emit_worker_result(result)
    return result


def repo_env() -> dict[str, str]:
    """This environment with the repository first on ``PYTHONPATH``: a child process imports this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_worker(module: str, argv: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python -m module argv`` in a fresh process and return the result it emitted.

    A fresh process per measurement is what makes a CPU peak RSS mean something: the high-water mark
    cannot be reset, and the allocator keeps what an earlier method freed.
    """
    proc = subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=REPO_ROOT,
        env=repo_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(WORKER_MARK):
            return json.loads(line[len(WORKER_MARK) :])
    tail = proc.stderr.strip()[-2000:]
    marker = "error: "
    last = tail.splitlines()[-1] if tail else ""
    if last.startswith(marker) and "pip install" in last:
        raise MissingDependency(last[len(marker) :])
    raise RuntimeError(
        f"worker `python -m {module} {' '.join(argv)}` failed (exit {proc.returncode}):\n{tail}"
    )


# --------------------------------------------------------------------------------------------- plots


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display on servers and CI)."""
    mpl = require("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path | str) -> Path:
    """Save and close ``fig`` (an open figure per plot leaks memory over a long sweep)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    fig.canvas.figure.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- models


#: Llama-shaped configurations: random weights from a config, for timing only (speed does not depend on
#: the weights' values). ``smollm2`` is SmolLM2-135M's shape, ``1b`` is Llama-3.2-1B's.
LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, tie_word_embeddings=True,
    ),
    "smollm2": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
    "1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
}  # fmt: skip


def llama_from_config(shape: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` of one of :data:`LLAMA_SHAPES` (eval mode, on CPU)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(**{**LLAMA_SHAPES[shape], **overrides})
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


#: ``--size`` of the speed benchmarks -> its :data:`LLAMA_SHAPES` entry.
SIZE_SHAPES = {"135m": "smollm2", "1b": "1b", "tiny": "tiny"}


def load_base_model(
    size: str, weights: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Any:
    """The dense base of the speed benchmarks (``--size``, ``--weights``), in eval mode on ``device``.

    ``135m`` with ``real`` weights is SmolLM2-135M-Instruct; everything else is a random Llama of the
    size's shape, built directly on ``device`` (speed does not depend on the weights' values, and a 1B
    model need not pass through CPU memory).
    """
    if size == "135m" and weights == "real":
        from peft_gates import assets

        model, _ = load_asset(assets.load_smollm2, dtype=dtype)
    else:
        with torch.device(device):
            model = llama_from_config(SIZE_SHAPES[size], dtype=dtype)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------- tiny stand-ins


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> Any:
    """A character-level fast tokenizer with a ChatML template, built in memory (no hub, no files).

    Only for smoke tests of the benchmark plumbing with random tiny models: every code path a real
    tokenizer takes (padding sides, chat template, SFT prompt/completion masking) runs, in milliseconds.
    """
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    specials = ["[PAD]", "[UNK]", "[CLS]", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=512,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_causal_lm(tokenizer: Any, seed: int = 0) -> Any:
    """A 2-layer random Llama sized to ``tokenizer`` (smoke tests only: its accuracy means nothing)."""
    return llama_from_config(
        "tiny",
        seed=seed,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def tiny_classifier(tokenizer: Any, seed: int = 0) -> Any:
    """A 2-layer random BERT sequence classifier sized to ``tokenizer`` (smoke tests only)."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id, num_labels=2,
    )  # fmt: skip
    return AutoModelForSequenceClassification.from_config(config)


_GOOD = ("good", "great", "fine", "lovely", "moving", "smart")
_BAD = ("bad", "dull", "awful", "boring", "weak", "messy")
_FILL = ("the film", "this movie", "a story", "its cast", "the plot", "every scene")


def synthetic_sentiment(n: int, seed: int = 0) -> list[Pair]:
    """``n`` made-up (sentence, label) pairs with a learnable cue word (smoke tests only, not a claim)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(_GOOD if label else _BAD)
        out.append((f"{rng.choice(_FILL)} is {word}", label))
    return out


def take(pairs: Sequence[Pair], n: int) -> list[Pair]:
    """The first ``n`` pairs (all when ``n <= 0``); the split is already shuffled, so a head is a sample."""
    return list(pairs) if n <= 0 else list(pairs[:n])
