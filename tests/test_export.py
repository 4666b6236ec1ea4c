"""Exports of a pruned model: per-layer (Auto classes), zero-padded stock, atomic saving, the report."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import transformers
from test_pruning import ARCHS, assert_close, auto_class, gated_model, inputs, logits

from peft_gates.export import register_pruned_architectures, save_pruned, write_file
from peft_gates.pruning import layer_widths, plan_pruning, prune_and_unload
from peft_gates.report import report_dict, report_markdown, write_report

register_pruned_architectures()


def pruned(model_type: str, task: str = "lm"):
    """(pruned model, its plan, the gated model's eval logits on ``inputs()``)."""
    peft_model, _ = gated_model(model_type, "units", task=task)
    reference = logits(peft_model, inputs())
    plan = plan_pruning(peft_model, multiple_of=1)
    return prune_and_unload(peft_model, multiple_of=1), plan, reference


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


@pytest.mark.parametrize("model_type", ARCHS)
def test_per_layer_and_zero_pad_exports_reload_exactly(model_type: str, tmp_path: Path) -> None:
    model, plan, reference = pruned(model_type)
    auto = auto_class(model_type)

    save_pruned(model, tmp_path / "per_layer", report=plan)
    config = json.loads((tmp_path / "per_layer" / "config.json").read_text())
    assert config["model_type"] == f"{model_type}_pruned"
    assert config["pruned_layers"] == plan.widths()
    reloaded = auto.from_pretrained(tmp_path / "per_layer").eval()
    assert type(reloaded).__name__.startswith("Pruned")
    assert layer_widths(reloaded) == plan.widths()
    assert_close(logits(reloaded, inputs()), reference)
    assert {"compression_report.json", "compression_report.md", "compression_report.png"} <= set(
        listing(tmp_path / "per_layer")
    )

    save_pruned(model, tmp_path / "zero_pad", layout="zero_pad")
    config = json.loads((tmp_path / "zero_pad" / "config.json").read_text())
    assert config["model_type"] == model_type and "pruned_layers" not in config
    stock = auto.from_pretrained(tmp_path / "zero_pad").eval()
    assert type(stock).__module__.startswith("transformers.models.")  # a stock class, no peft_gates code
    widths = layer_widths(stock)
    assert all(w == widths[0] for w in widths)
    assert widths[0]["intermediate_size"] == max(w["intermediate_size"] for w in plan.widths())
    assert_close(logits(stock, inputs()), reference)


def test_zero_pad_uses_the_widest_kept_heads_where_the_config_allows(tmp_path: Path) -> None:
    for model_type, heads in (("llama", 2), ("gpt2", 4)):  # GPT-2 derives head_dim from n_embd / n_head
        model, _, _ = pruned(model_type)
        save_pruned(model, tmp_path / model_type, layout="zero_pad")
        config = transformers.AutoConfig.from_pretrained(tmp_path / model_type)
        assert config.num_attention_heads == heads


def test_plain_save_pretrained_of_the_pruned_model_reloads(tmp_path: Path) -> None:
    model, plan, reference = pruned("qwen3")
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_close(logits(reloaded, inputs()), reference)


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_sequence_classifier_exports(model_type: str, tmp_path: Path) -> None:
    model, _, reference = pruned(model_type, task="seq_cls")
    for layout in ("per_layer", "zero_pad"):
        save_pruned(model, tmp_path / layout, layout=layout)
        reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / layout).eval()
        assert_close(logits(reloaded, inputs()), reference)


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 20)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")


def test_tokenizer_and_generation_config_are_saved(tmp_path: Path) -> None:
    model, _, _ = pruned("llama")
    save_pruned(model, tmp_path / "out", tokenizer=tiny_tokenizer())
    assert "generation_config.json" in listing(tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer("w3 w4").input_ids == [3, 4]


def test_non_empty_dir_needs_overwrite(tmp_path: Path) -> None:
    model, _, reference = pruned("mistral")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match=f"out_dir='{out}'.*overwrite=True"):
        save_pruned(model, out)
    assert listing(out) == ["keep.txt"]
    save_pruned(model, out, overwrite=True)
    assert "keep.txt" not in listing(out) and "model.safetensors" in listing(out)
    assert listing(tmp_path) == ["out"]
    assert_close(logits(transformers.AutoModelForCausalLM.from_pretrained(out).eval(), inputs()), reference)


def test_empty_existing_dir_is_fine(tmp_path: Path) -> None:
    model, _, _ = pruned("gpt2")
    (tmp_path / "out").mkdir()
    save_pruned(model, tmp_path / "out")
    assert "config.json" in listing(tmp_path / "out")


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_nothing_behind(existing: bool, tmp_path: Path, monkeypatch) -> None:
    model, plan, _ = pruned("llama")
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("old")

    def broken_report(plan, directory):
        (Path(directory) / "half.json").write_text("{")
        raise OSError("disk full")

    monkeypatch.setattr("peft_gates.report.write_report", broken_report)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, out, report=plan, overwrite=True)
    assert listing(tmp_path) == (["out"] if existing else [])
    if existing:
        assert listing(out) == ["old.txt"]


def test_a_model_that_still_carries_gates_is_refused(tmp_path: Path) -> None:
    """Saving before the merge would write an adapter (or a model with random blocks) as the export."""
    peft_model, _ = gated_model("llama", "units")
    with pytest.raises(TypeError, match="PeftModel that still carries adapters.*merge_and_unload"):
        save_pruned(peft_model, tmp_path / "a")
    with pytest.raises(TypeError, match="GateModel .*adapter layer at .*merge_and_unload"):
        save_pruned(peft_model.base_model, tmp_path / "b")
    assert listing(tmp_path) == []


def test_a_symlinked_out_dir_receives_the_export(tmp_path: Path) -> None:
    """out_dir may point elsewhere (a bigger disk): the export lands there and the link stays."""
    model, _, reference = pruned("llama")
    (tmp_path / "disk").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "disk")
    assert save_pruned(model, tmp_path / "link") == tmp_path / "link"
    assert (tmp_path / "link").is_symlink() and "model.safetensors" in listing(tmp_path / "disk")
    assert listing(tmp_path) == ["disk", "link"]
    save_pruned(model, tmp_path / "link", overwrite=True)  # replacing keeps the link too
    assert (tmp_path / "link").is_symlink() and listing(tmp_path) == ["disk", "link"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "link").eval()
    assert_close(logits(reloaded, inputs()), reference)


def test_a_file_is_never_replaced_by_an_export(tmp_path: Path) -> None:
    model, _, _ = pruned("llama")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt' is a file, not a directory"):
        save_pruned(model, tmp_path / "notes.txt", overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_failed_file_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "compression_report.json"
    target.write_text("old")

    def half_written(tmp: Path) -> None:
        tmp.write_text("{")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_file(target, half_written)
    assert target.read_text() == "old" and listing(tmp_path) == ["compression_report.json"]
    write_file(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new" and listing(tmp_path) == ["compression_report.json"]


def test_bad_layout_is_refused(tmp_path: Path) -> None:
    model, _, _ = pruned("llama")
    with pytest.raises(ValueError, match="layout='padded'"):
        save_pruned(model, tmp_path / "out", layout="padded")
    with pytest.raises(TypeError, match="tokenizer='gpt2' is not a tokenizer object.*AutoTokenizer"):
        save_pruned(model, tmp_path / "out", tokenizer="gpt2")
    with pytest.raises(TypeError, match="report='yes' is not a PrunePlan.*plan_pruning"):
        save_pruned(model, tmp_path / "out", report="yes")
    assert listing(tmp_path) == []


def test_report_files(tmp_path: Path) -> None:
    peft_model, _ = gated_model("phi3", "both")
    plan = plan_pruning(peft_model, multiple_of=1, seq_len=16)
    paths = write_report(plan, tmp_path)
    assert [p.name for p in paths] == [
        "compression_report.json",
        "compression_report.md",
        "compression_report.png",
    ]
    data = json.loads(paths[0].read_text())
    assert data == json.loads(json.dumps(report_dict(plan)))
    assert data["totals"]["params_model_after"] == plan.params_total_after
    assert [layer["kept_intermediate_size"] for layer in data["layers"]] == [32, 1]
    assert data["totals"]["zeroed_not_removable"] > 0
    table = report_markdown(plan)
    assert table.count("\n| ") == 1 + len(plan.layers)  # header + one row per layer (separator excluded)
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reloaded_per_layer_model_exports_again_as_zero_pad(tmp_path: Path) -> None:
    model, _, reference = pruned("gemma3_text")
    save_pruned(model, tmp_path / "a")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    save_pruned(reloaded, tmp_path / "b", layout="zero_pad")
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    assert_close(logits(stock, inputs()), reference)


def test_report_without_matplotlib_still_writes_text(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    peft_model, _ = gated_model("gpt2", "units")
    with pytest.warns(UserWarning, match="matplotlib"):
        paths = write_report(plan_pruning(peft_model, multiple_of=1), tmp_path)
    assert [p.name for p in paths] == ["compression_report.json", "compression_report.md"]
