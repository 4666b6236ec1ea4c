"""Small, reusable latency measurement: prefill at batch x seq and batched decode with a KV cache.

Pruning only pays off if the smaller model is really faster on the target hardware (odd widths can make
it slower, see the concepts page), so the numbers must come from the same, careful procedure every time:

* **prefill**: one forward over ``batch x seq_len`` random token ids, no cache, logits of the last position
  only (what generation needs; a full ``batch x seq x vocab`` logits tensor would time the LM head instead);
* **decode**: after an untimed prompt of ``batch x seq_len`` tokens, ``new_tokens`` greedy steps reusing the
  model's KV cache, timed together; tokens/s = ``batch * new_tokens / time``. A hand-written loop rather than
  ``generate`` so that neither the prompt nor ``generate``'s bookkeeping ends up in the number;
* ``warmup`` untimed runs first (allocator, kernel selection, lazy init), then ``repeats`` timed runs, of
  which the **median** is reported (robust to a stray slow run on a shared machine);
* every timed region ends with a device synchronize, so a CUDA timing measures the kernels, not their launch;
* models compared with each other (:func:`compare_latency`) are timed in **rounds**, every model once per
  round in a rotating order, and each keeps its fastest round: on a shared machine, interference only ever
  slows a measurement down, and timing the dense model entirely before the pruned one would hand every
  burst of background load to one side of the ratio.

Used by ``peft-gates bench`` and the main job; :func:`measure_latency` returns a :class:`LatencyResult`
whose :meth:`~LatencyResult.to_dict` is JSON-ready.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = [
    "LatencyResult",
    "TimingStats",
    "compare_latency",
    "measure_decode",
    "measure_latency",
    "measure_prefill",
    "random_input_ids",
    "rotate_rounds",
    "speedup_text",
    "speedups",
    "synchronize",
    "time_fn",
]

Key = TypeVar("Key")
Model = TypeVar("Model")
Measurement = TypeVar("Measurement")


def synchronize(device: torch.device | str) -> None:
    """Wait until queued work on ``device`` is done (CUDA and other async backends; a no-op on CPU).

    Without it a GPU timing stops when the kernels are *queued*, which can be long before they finish.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    sync = getattr(backend, "synchronize", None)
    if callable(sync):
        if device.type == "cuda":
            sync(device)
        else:
            sync()


@dataclass
class TimingStats:
    """Wall-clock samples of one timed operation, in seconds (median is the figure to report)."""

    samples_s: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.samples_s)

    @property
    def std_s(self) -> float:
        """Sample standard deviation (0 for a single sample).

        The benchmarks report the spread next to the median, so that a reader can see whether a ratio
        between two methods is larger than the noise of a shared machine.
        """
        return statistics.stdev(self.samples_s) if len(self.samples_s) > 1 else 0.0

    @property
    def min_s(self) -> float:
        return min(self.samples_s)

    @property
    def max_s(self) -> float:
        return max(self.samples_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median_s,
            "mean_s": self.mean_s,
            "std_s": self.std_s,
            "min_s": self.min_s,
            "max_s": self.max_s,
            "samples_s": list(self.samples_s),
        }


def time_fn(
    fn: Callable[[], Any],
    repeats: int = 5,
    warmup: int = 2,
    device: torch.device | str = "cpu",
    on_sample: Callable[[], None] | None = None,
) -> TimingStats:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed, synchronizing ``device``.

    ``on_sample`` is called after every call (warm-up included), outside the timed region: a hook for
    progress bars that does not disturb the measurement.
    """
    _check_counts(repeats, warmup)
    for _ in range(warmup):
        fn()
        if on_sample is not None:
            on_sample()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
        if on_sample is not None:
            on_sample()
    return TimingStats(samples)


def _check_counts(repeats: int, warmup: int) -> None:
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} is invalid: time at least one run (the median of repeats)")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup={warmup!r} is invalid: use an integer >= 0")


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _vocab_size(model: nn.Module) -> int:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    if not vocab:
        raise ValueError(f"{type(model).__name__}.config has no vocab_size: cannot make token-id inputs")
    return int(vocab)


def _max_positions(model: nn.Module) -> int | None:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(text, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def random_input_ids(
    vocab_size: int, batch: int, seq_len: int, seed: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``batch x seq_len`` token ids drawn from a private generator (same ids for every model timed).

    Content does not change the cost of a dense forward, but identical inputs keep dense-vs-pruned
    comparisons free of any doubt. Ids avoid the first few (often special) tokens when the vocabulary allows.
    """
    low = 3 if vocab_size > 3 else 0
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab_size, (batch, seq_len), generator=generator).to(device)


def _cache_argument(model: nn.Module) -> str:
    """The forward argument that takes the KV cache: ``cache`` in recent transformers, ``past_key_values``
    before (still accepted there, with a deprecation warning on every call site)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(output: Any) -> Any:
    """The KV cache a forward returned, under its new (``cache``) or former (``past_key_values``) name."""
    keys = output.keys() if hasattr(output, "keys") else ()
    for name in ("cache", "past_key_values"):
        if name in keys:
            return output[name]
    return None


def _forward_kwargs(model: nn.Module, use_cache: bool | None = None) -> dict[str, Any]:
    """``logits_to_keep=1`` (generation reads the last position) and ``use_cache`` where forward names them.

    Only what the forward names: encoders take neither, and BERT's forward refuses ``use_cache`` under
    transformers 4.x although its config carries the attribute.
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    wanted = {"logits_to_keep": 1, "use_cache": use_cache}
    return {name: value for name, value in wanted.items() if value is not None and name in params}


def measure_prefill(
    model: nn.Module,
    input_ids: torch.Tensor,
    repeats: int = 5,
    warmup: int = 2,
    on_sample: Callable[[], None] | None = None,
) -> TimingStats:
    """Time one forward over ``input_ids`` (no KV cache; last-position logits where supported)."""
    kwargs = _forward_kwargs(model, use_cache=False)
    with torch.inference_mode():
        return time_fn(
            lambda: model(input_ids=input_ids, **kwargs), repeats, warmup, input_ids.device, on_sample
        )


def measure_decode(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    new_tokens: int,
    repeats: int = 5,
    warmup: int = 2,
    on_sample: Callable[[], None] | None = None,
) -> TimingStats:
    """Time ``new_tokens`` greedy decode steps with the model's KV cache, after an untimed prompt.

    Each run starts from a fresh cache: the prompt forward (``use_cache=True``) fills it, then each step
    feeds the argmax token of the previous step. Only the steps are timed.
    """
    _check_counts(repeats, warmup)
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens={new_tokens!r} is invalid: decode at least one token")
    device = prompt_ids.device
    kwargs = _forward_kwargs(model)
    cache_arg = _cache_argument(model)
    samples = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            out = model(input_ids=prompt_ids, use_cache=True, **kwargs)
            cache = _returned_cache(out)
            if cache is None:
                raise ValueError(
                    f"{type(model).__name__} returned no KV cache: it cannot be timed for decode"
                )
            token = out.logits[:, -1:].argmax(-1)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=token, use_cache=True, **{cache_arg: cache})
                cache = _returned_cache(out)
                token = out.logits[:, -1:].argmax(-1)
            synchronize(device)
            if i >= warmup:
                samples.append(time.perf_counter() - start)
            if on_sample is not None:
                on_sample()
    return TimingStats(samples)


@dataclass
class LatencyResult:
    """Prefill latency and decode throughput of one model at one shape.

    Attributes:
        batch, seq_len: prefill shape (also the decode batch and prompt length).
        new_tokens: timed decode steps per run.
        repeats, warmup: timed and untimed runs; figures are medians over ``repeats``.
        device, dtype: where and in which dtype the model ran.
        parameters: parameter count of the model (what pruning shrinks).
        prefill: timing samples of the prefill forward.
        decode: timing samples of the ``new_tokens`` decode steps; ``None`` when decode was not measured.
        decode_skipped: why decode was not measured (not a generative model, or not asked for).
        prefill_rounds_s, decode_rounds_s: the median of every round, in round order, when the result is
            the best of several rounds (:func:`compare_latency`); ``prefill``/``decode`` are then the
            fastest round's samples. Empty for a single measurement.
    """

    batch: int
    seq_len: int
    new_tokens: int
    repeats: int
    warmup: int
    device: str
    dtype: str
    parameters: int
    prefill: TimingStats
    decode: TimingStats | None = None
    decode_skipped: str | None = None
    prefill_rounds_s: list[float] = field(default_factory=list)
    decode_rounds_s: list[float] = field(default_factory=list)

    @property
    def prefill_ms(self) -> float:
        return 1000.0 * self.prefill.median_s

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.seq_len / self.prefill.median_s

    @property
    def decode_ms_per_step(self) -> float | None:
        return None if self.decode is None else 1000.0 * self.decode.median_s / self.new_tokens

    @property
    def decode_tokens_per_s(self) -> float | None:
        return None if self.decode is None else self.batch * self.new_tokens / self.decode.median_s

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the settings, the medians, and the raw samples."""
        return {
            "batch": self.batch,
            "seq_len": self.seq_len,
            "new_tokens": self.new_tokens,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "device": self.device,
            "dtype": self.dtype,
            "parameters": self.parameters,
            "prefill_ms": self.prefill_ms,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_ms_per_step": self.decode_ms_per_step,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "decode_skipped": self.decode_skipped,
            "rounds": max(1, len(self.prefill_rounds_s)),
            "prefill_rounds_s": list(self.prefill_rounds_s),
            "decode_rounds_s": list(self.decode_rounds_s),
            "prefill": self.prefill.to_dict(),
            "decode": None if self.decode is None else self.decode.to_dict(),
        }


def _can_generate(model: nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    return bool(can()) if callable(can) else False


def measure_latency(
    model: nn.Module,
    batch: int = 1,
    seq_len: int = 128,
    new_tokens: int = 32,
    *,
    repeats: int = 5,
    warmup: int = 2,
    decode: bool = True,
    seed: int = 0,
    on_sample: Callable[[], None] | None = None,
) -> LatencyResult:
    """Prefill latency at ``batch x seq_len`` and decode tokens/s over ``new_tokens`` steps of ``model``.

    The model is timed where it is (its device and dtype; move it first) and in eval mode (restored
    afterwards). Decode is measured for generative models only (``model.can_generate()``); encoders get
    prefill only, with the reason in ``decode_skipped``. Inputs are random token ids from ``seed``, so two
    models of the same vocabulary see the same inputs.

    Raises:
        ValueError: bad counts, or ``seq_len + new_tokens`` beyond the model's position embeddings.
    """
    for name, value in (("batch", batch), ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: use an integer >= 1")
    _check_counts(repeats, warmup)
    if not isinstance(new_tokens, int) or new_tokens < 0:
        raise ValueError(f"new_tokens={new_tokens!r} is invalid: use an integer >= 0 (0: prefill only)")
    generative = _can_generate(model)
    do_decode = decode and generative and new_tokens > 0
    limit = _max_positions(model)
    needed = seq_len + (new_tokens if do_decode else 0)
    if limit is not None and needed > limit:
        what = f"seq_len={seq_len} + new_tokens={new_tokens}" if do_decode else f"seq_len={seq_len}"
        raise ValueError(
            f"{what} = {needed} positions exceed the model's {limit} position embeddings; time a shorter "
            "sequence"
        )
    device = _model_device(model)
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None else torch.get_default_dtype()
    ids = random_input_ids(_vocab_size(model), batch, seq_len, seed=seed, device=device)
    was_training = model.training
    model.eval()
    try:
        prefill = measure_prefill(model, ids, repeats, warmup, on_sample)
        timing = measure_decode(model, ids, new_tokens, repeats, warmup, on_sample) if do_decode else None
    finally:
        model.train(was_training)
    if do_decode:
        skipped = None
    elif not decode or new_tokens <= 0:
        skipped = "not requested"
    else:
        skipped = f"{type(model).__name__} is not a generative model"
    return LatencyResult(
        batch=batch,
        seq_len=seq_len,
        new_tokens=new_tokens if do_decode else 0,
        repeats=repeats,
        warmup=warmup,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        parameters=sum(p.numel() for p in model.parameters()),
        prefill=prefill,
        decode=timing,
        decode_skipped=skipped,
    )


def rotate_rounds(
    models: Mapping[Key, Model],
    measure: Callable[[Model], Measurement],
    rounds: int,
    on_round: Callable[[], None] | None = None,
) -> dict[Key, list[Measurement]]:
    """``measure`` every model ``rounds`` times: all models once per round, the order rotated each round.

    Round ``r`` starts with the ``r``-th model, so no model always runs first (cold caches) or always
    follows the same one, and slow phases of a shared machine fall on every model alike. Returns each
    model's measurements in round order; ``on_round`` is called after every round (progress bars).
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} is invalid: time every model at least once (rounds >= 1)")
    names = list(models)
    if not names:
        raise ValueError("models is empty: pass at least one model to time")
    out: dict[Key, list[Measurement]] = {name: [] for name in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            out[name].append(measure(models[name]))
        if on_round is not None:
            on_round()
    return out


def compare_latency(
    models: Mapping[str, nn.Module],
    batch: int = 1,
    seq_len: int = 128,
    new_tokens: int = 32,
    *,
    rounds: int = 3,
    repeats: int = 5,
    warmup: int = 2,
    decode: bool = True,
    seed: int = 0,
    on_round: Callable[[], None] | None = None,
) -> dict[str, LatencyResult]:
    """:func:`measure_latency` of every model, best of ``rounds`` rotating rounds (see :func:`rotate_rounds`).

    Each model keeps the round with the fastest prefill median and, separately, the round with the fastest
    decode median (interference only slows a run down, so the fastest round is the least disturbed one);
    every round's median stays in ``prefill_rounds_s``/``decode_rounds_s``, the spread to report beside a
    ratio. All models get the same random inputs (same ``seed``) and must fit on their devices together.
    """

    def measure(model: nn.Module) -> LatencyResult:
        return measure_latency(
            model, batch, seq_len, new_tokens, repeats=repeats, warmup=warmup, decode=decode, seed=seed
        )

    results = {}
    for name, runs in rotate_rounds(models, measure, rounds, on_round).items():
        best = min(runs, key=lambda run: run.prefill.median_s)
        decoded = [run for run in runs if run.decode is not None]
        best_decode = min(decoded, key=lambda run: run.decode.median_s).decode if decoded else None
        results[name] = replace(
            best,
            decode=best_decode,
            prefill_rounds_s=[run.prefill.median_s for run in runs],
            decode_rounds_s=[run.decode.median_s for run in decoded],
        )
    return results


def speedups(reference: LatencyResult, candidate: LatencyResult) -> dict[str, Any]:
    """How much faster ``candidate`` is than ``reference``: prefill and decode ratios (> 1: faster).

    ``prefill``/``decode`` compare the best rounds; ``prefill_rounds``/``decode_rounds`` compare round by
    round (both models were timed in the same round, back to back), so their range is the spread to quote
    beside the ratio. ``decode`` is ``None`` when either model was timed without decode.
    """
    for what in ("prefill_rounds_s", "decode_rounds_s"):
        if len(getattr(reference, what)) != len(getattr(candidate, what)):
            raise ValueError(
                f"{what}: {len(getattr(reference, what))} rounds vs {len(getattr(candidate, what))}; compare "
                "results of one compare_latency call, whose models were timed in the same rounds"
            )
    decode = None
    if reference.decode is not None and candidate.decode is not None:
        decode = reference.decode.median_s / candidate.decode.median_s
    return {
        "prefill": reference.prefill.median_s / candidate.prefill.median_s,
        "decode": decode,
        "prefill_rounds": [
            r / c for r, c in zip(reference.prefill_rounds_s, candidate.prefill_rounds_s, strict=True)
        ],
        "decode_rounds": [
            r / c for r, c in zip(reference.decode_rounds_s, candidate.decode_rounds_s, strict=True)
        ],
    }


def speedup_text(ratio: float, per_round: list[float]) -> str:
    """``1.23x``, or ``1.23x (rounds 1.07-1.29x)`` when timed in rounds: a ratio with its spread beside it."""
    spread = f" (rounds {min(per_round):.2f}-{max(per_round):.2f}x)" if len(per_round) > 1 else ""
    return f"{ratio:.2f}x{spread}"
