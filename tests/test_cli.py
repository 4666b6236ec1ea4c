"""The ``peft-gates`` command line and the latency module behind ``bench``.

Most tests call ``peft_gates.cli.main(argv)`` in-process (the exit code is its return value, output goes
through capsys); two run the installed console script in a subprocess, to check the entry point and real
exit codes. The models are tiny random ones saved to a temporary directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from tiny import VOCAB, tiny_config, tiny_inputs, tiny_model

import peft_gates
from peft_gates import GateConfig
from peft_gates.cli import main
from peft_gates.latency import compare_latency, measure_latency, rotate_rounds
from peft_gates.pruning import layer_widths


def _tokenizer():
    """A word-level tokenizer over the tiny vocabulary (prune copies it into the export)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def _close_some(model) -> None:
    """Stand-in for training: close half the units of block 0 and a quarter of block 1 (theta -3 / 3)."""
    with torch.no_grad():
        for name, theta in model.named_parameters():
            if "peft_gates_" in name:
                theta.fill_(3.0)
                theta[: theta.numel() // (2 if ".layers.0." in name else 4)] = -3.0


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """A saved tiny Llama base (with tokenizer), a trained-looking units adapter, and the gated logits."""
    root = tmp_path_factory.mktemp("cli")
    base = tiny_model("llama", intermediate_size=64)
    base.save_pretrained(root / "base")
    _tokenizer().save_pretrained(root / "base")
    model = get_peft_model(
        type(base).from_pretrained(root / "base"),
        peft_gates.GateConfig(task_type="CAUSAL_LM", placement="units"),
    )
    _close_some(model)
    model.save_pretrained(root / "adapter")
    x = tiny_inputs()
    with torch.no_grad():
        logits = model.eval()(x).logits
    return {"root": root, "base": root / "base", "adapter": root / "adapter", "x": x, "logits": logits}


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    """Exit code 1, one ``error: ...`` line on stderr, no traceback."""
    assert code == 1
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------------------------------------- help


def _console_script() -> list[str]:
    script = shutil.which("peft-gates", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "peft_gates.cli"]


def test_console_script_help_and_exit_codes(tmp_path):
    result = subprocess.run([*_console_script(), "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for word in ("prune", "report", "bench", "examples:", "peft-gates prune --base"):
        assert word in result.stdout
    result = subprocess.run(
        [
            *_console_script(),
            "prune",
            "--base",
            tmp_path / "missing",
            "--adapter",
            tmp_path,
            "--out",
            tmp_path,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: --base")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("command", "words"),
    [
        ("prune", ["--base", "--adapter", "--out", "--multiple-of", "--layout", "zero_pad", "examples:"]),
        ("report", ["PATH", "--base", "compression_report", "examples:"]),
        ("bench", ["--dense", "--pruned", "--new-tokens", "median", "examples:"]),
    ],
)
def test_subcommand_help_stands_on_its_own(capsys, command, words):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for word in words:
        assert word in out, word


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert peft_gates.__version__ in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- prune


def test_prune_export_reloads_with_the_gated_logits(saved, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, stdout, err = run(
        capsys,
        "prune",
        "--base",
        saved["base"],
        "--adapter",
        saved["adapter"],
        "--out",
        out,
        "--multiple-of",
        1,
    )
    assert code == 0, err
    assert "parameters" in stdout and "removed" in stdout and "import peft_gates" in stdout
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert {"compression_report.json", "compression_report.md", "compression_report.png"} <= files
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama_pruned"
    assert [w["intermediate_size"] for w in layer_widths(reloaded)] == [32, 48]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(saved["x"]).logits, saved["logits"], atol=1e-5, rtol=1e-5)


def test_prune_folds_a_low_rank_update(saved, tmp_path, capsys):
    """An adapter with ``lora_rank`` prunes from the command line like any other; its update is folded."""
    model = get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(saved["base"]),
        peft_gates.GateConfig(task_type="CAUSAL_LM", placement="units", scale_gates="both", lora_rank=2),
    )
    _close_some(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "peft_gates_lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        logits = model.eval()(saved["x"]).logits
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "pruned"
    adapter = tmp_path / "adapter"
    code, _, err = run(
        capsys, "prune", "--base", saved["base"], "--adapter", adapter, "--out", out, "--multiple-of", 1
    )
    assert code == 0, err
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert sum(p.numel() for p in reloaded.parameters()) < sum(
        p.numel() for n, p in model.named_parameters() if "peft_gates_" not in n
    )
    with torch.no_grad():
        torch.testing.assert_close(reloaded(saved["x"]).logits, logits, atol=1e-5, rtol=1e-5)


def test_prune_zero_pad_layout_is_a_stock_checkpoint(saved, tmp_path, capsys):
    out = tmp_path / "stock"
    code, _, err = run(
        capsys, "prune", "--base", saved["base"], "--adapter", saved["adapter"], "--out", out,
        "--multiple-of", 1, "--layout", "zero_pad",
    )  # fmt: skip
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["intermediate_size"] == 48
    stock = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(saved["x"]).logits, saved["logits"], atol=1e-5, rtol=1e-5)


def test_prune_sequence_classifier_takes_the_label_count_from_the_adapter(tmp_path, capsys):
    """The base is a bare encoder; the adapter's saved head has 3 labels: the CLI builds a 3-label model."""
    torch.manual_seed(0)
    config = tiny_config("bert")
    config.num_labels = 3
    classifier = transformers.AutoModelForSequenceClassification.from_config(config)
    encoder = transformers.BertModel(tiny_config("bert"), add_pooling_layer=True)  # a 2-label config
    encoder.load_state_dict(classifier.bert.state_dict())
    encoder.save_pretrained(tmp_path / "encoder")
    model = get_peft_model(classifier, peft_gates.GateConfig(task_type="SEQ_CLS", placement="units"))
    _close_some(model)
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model.eval()(tiny_inputs()).logits
    code, _, err = run(
        capsys, "prune", "--base", tmp_path / "encoder", "--adapter", tmp_path / "adapter", "--out",
        tmp_path / "out", "--multiple-of", 1,
    )  # fmt: skip
    assert code == 0, err
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tiny_inputs()).logits, expected, atol=1e-5, rtol=1e-5)


def test_prune_refuses_a_non_empty_out_without_overwrite(saved, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "prune", "--base", saved["base"], "--adapter", saved["adapter"], "--out", out)
    assert_user_error(code, err, "--out", "not empty", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run(
        capsys, "prune", "--base", saved["base"], "--adapter", saved["adapter"], "--out", out, "--overwrite"
    )
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_prune_missing_paths(saved, tmp_path, capsys):
    code, _, err = run(
        capsys, "prune", "--base", tmp_path / "nope", "--adapter", saved["adapter"], "--out", tmp_path / "o"
    )
    assert_user_error(code, err, "--base", "nope", "no such directory")
    code, _, err = run(
        capsys, "prune", "--base", saved["base"], "--adapter", tmp_path / "nope", "--out", tmp_path / "o"
    )
    assert_user_error(code, err, "--adapter", "no such directory")
    code, _, err = run(
        capsys, "prune", "--base", saved["base"], "--adapter", saved["base"], "--out", tmp_path / "o"
    )
    assert_user_error(code, err, "no adapter_config.json")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(saved["adapter"] / "adapter_config.json", partial)
    code, _, err = run(
        capsys, "prune", "--base", saved["base"], "--adapter", partial, "--out", tmp_path / "o"
    )
    assert_user_error(code, err, "--adapter", "no adapter_model.safetensors", "whole directory")
    assert not (tmp_path / "o").exists()


def test_prune_refuses_an_out_that_is_or_holds_an_input(saved, tmp_path, capsys):
    """--overwrite would otherwise delete the adapter or the base the export is built from."""
    project = tmp_path / "project"
    shutil.copytree(saved["adapter"], project / "adapter")
    shutil.copytree(saved["base"], project / "base")
    before = {name: listing(project / name) for name in ("adapter", "base")}
    for out, named in ((project / "adapter", "--adapter"), (project, "--base")):
        code, _, err = run(capsys, "prune", "--base", project / "base", "--adapter", project / "adapter",
                           "--out", out, "--overwrite")  # fmt: skip
        assert_user_error(code, err, f"--out {out} is or contains {named}", "another --out")
    assert {name: listing(project / name) for name in ("adapter", "base")} == before


def test_prune_a_family_without_a_table_entry_saves_it_folded(tmp_path, capsys):
    """OPT has no architecture entry: the gates are folded into the stock model, which is saved as is."""
    config = transformers.OPTConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.OPTForCausalLM(config).save_pretrained(tmp_path / "base")
    gated = get_peft_model(transformers.OPTForCausalLM.from_pretrained(tmp_path / "base"), GateConfig())
    with torch.no_grad():  # stand-in for training: a quarter closed, a quarter scaled, the rest open
        for name, theta in gated.named_parameters():
            if "peft_gates_" in name:
                theta.fill_(3.0)
                theta[::4] = -3.0
                theta[1::4] = 0.3
        x = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
        logits = gated.eval()(x).logits
    gated.save_pretrained(tmp_path / "adapter")
    code, out, err = run(
        capsys,
        "prune",
        "--base",
        tmp_path / "base",
        "--adapter",
        tmp_path / "adapter",
        "--out",
        tmp_path / "o",
    )
    assert code == 0, err
    assert "opt has no architecture entry" in out and "nothing was cut out" in out
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    assert type(reloaded) is transformers.OPTForCausalLM
    dense = sum(p.numel() for n, p in gated.named_parameters() if "peft_gates_" not in n)
    assert sum(p.numel() for p in reloaded.parameters()) == dense  # folded, not cut
    with torch.no_grad():  # the gates' effect is in the saved weights
        torch.testing.assert_close(reloaded(x).logits, logits, atol=1e-5, rtol=1e-5)


def test_prune_adapter_base_mismatch(saved, tmp_path, capsys):
    tiny_model("llama", intermediate_size=48).save_pretrained(tmp_path / "other")
    code, _, err = run(
        capsys, "prune", "--base", tmp_path / "other", "--adapter", saved["adapter"], "--out", tmp_path / "o"
    )
    assert_user_error(code, err, "does not fit", "size mismatch", "mlp.down_proj", "[64]", "[48]")
    tiny_model("bert").save_pretrained(tmp_path / "bert")
    code, _, err = run(
        capsys, "prune", "--base", tmp_path / "bert", "--adapter", saved["adapter"], "--out", tmp_path / "o"
    )
    assert_user_error(code, err, "does not fit")


def test_prune_refuses_other_adapter_types(saved, tmp_path, capsys):
    lora = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    code, _, err = run(
        capsys, "prune", "--base", saved["base"], "--adapter", tmp_path / "lora", "--out", tmp_path / "o"
    )
    assert_user_error(code, err, "LORA adapter", "PEFT_GATES")


def test_bad_arguments_exit_2(saved, tmp_path, capsys):
    for argv in (
        ["prune", "--base", saved["base"], "--adapter", saved["adapter"]],  # no --out
        [
            "prune",
            "--base",
            saved["base"],
            "--adapter",
            saved["adapter"],
            "--out",
            tmp_path,
            "--multiple-of",
            "0",
        ],
        [
            "prune",
            "--base",
            saved["base"],
            "--adapter",
            saved["adapter"],
            "--out",
            tmp_path,
            "--layout",
            "flat",
        ],
        ["bench", "--dense", saved["base"], "--pruned", saved["base"], "--batch", "x"],
        ["report", saved["adapter"]],  # an adapter needs --base
        ["frobnicate"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in argv])
        assert exit_info.value.code == 2, argv
        assert "error:" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- report


def test_report_on_an_adapter_writes_table_json_and_png(saved, tmp_path, capsys):
    code, out, err = run(
        capsys, "report", saved["adapter"], "--base", saved["base"], "--out", tmp_path, "--multiple-of", 1
    )
    assert code == 0, err
    assert "| layer | neurons kept |" in out and "32 of 64" in out and "48 of 64" in out
    assert "closed" in out  # the gate statistics summary
    data = json.loads((tmp_path / "compression_report.json").read_text())
    assert data["multiple_of"] == 1 and [layer["kept_intermediate_size"] for layer in data["layers"]] == [
        32,
        48,
    ]
    assert (tmp_path / "compression_report.png").stat().st_size > 0
    assert (tmp_path / "compression_report.md").read_text().startswith("# Compression report")


def test_report_on_an_export_reads_its_report(saved, tmp_path, capsys):
    export = tmp_path / "export"
    assert run(capsys, "prune", "--base", saved["base"], "--adapter", saved["adapter"], "--out", export,
               "--multiple-of", 1)[0] == 0  # fmt: skip
    written = json.loads((export / "compression_report.json").read_text())
    code, out, err = run(capsys, "report", export, "--out", tmp_path / "copy")
    assert code == 0, err
    assert "32 of 64" in out and "model parameters" in out
    assert json.loads((tmp_path / "copy" / "compression_report.json").read_text()) == written
    assert (tmp_path / "copy" / "compression_report.png").stat().st_size > 0

    for name in ("compression_report.json", "compression_report.md", "compression_report.png"):
        (export / name).unlink()
    before = listing(export)
    code, out, err = run(capsys, "report", export)  # no --out: the export is read, never written
    assert code == 0, err
    assert "| 0 | 32 of 64 |" in out and "| 1 | 48 of 64 |" in out and "pass --out DIR" in out
    assert listing(export) == before
    code, out, err = run(capsys, "report", export, "--out", tmp_path / "plot")
    assert code == 0, err
    assert listing(tmp_path / "plot") == ["compression_report.png"]

    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(export), "--multiple-of", "1"])
    assert exit_info.value.code == 2 and "applies only to an adapter" in capsys.readouterr().err


def test_report_without_out_leaves_the_adapter_as_it_was(saved, capsys):
    before = listing(saved["adapter"])
    code, out, err = run(capsys, "report", saved["adapter"], "--base", saved["base"])
    assert code == 0, err
    assert "| layer | neurons kept |" in out and "pass --out DIR" in out
    assert listing(saved["adapter"]) == before


def test_report_refuses_a_plain_checkpoint(saved, capsys):
    code, _, err = run(capsys, "report", saved["base"])
    assert_user_error(code, err, "compression_report.json", "pruned_layers")


# --------------------------------------------------------------------------------------------- bench


def test_bench_prints_a_table_and_writes_json(saved, tmp_path, capsys):
    export = tmp_path / "export"
    assert run(capsys, "prune", "--base", saved["base"], "--adapter", saved["adapter"], "--out", export,
               "--multiple-of", 1)[0] == 0  # fmt: skip
    code, out, err = run(
        capsys, "bench", "--dense", saved["base"], "--pruned", export, "--batch", 2, "--seq", 8,
        "--new-tokens", 3, "--repeats", 1, "--warmup", 0, "--threads", 1, "--rounds", 2,
        "--json", tmp_path / "bench.json",
    )  # fmt: skip
    assert code == 0, err
    assert "prefill ms" in out and "decode tok/s" in out and "speedup of pruned over dense" in out
    assert "best of 2 rotating rounds" in out and "(rounds " in out
    lines = out.splitlines()
    assert any(line.startswith("dense ") for line in lines) and any(
        line.startswith("pruned ") for line in lines
    )
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["results"]["pruned"]["parameters"] < data["results"]["dense"]["parameters"]
    assert data["results"]["dense"]["decode_tokens_per_s"] > 0 and data["speedup"]["prefill"] > 0
    dense, pruned = data["results"]["dense"], data["results"]["pruned"]
    assert dense["rounds"] == 2 and len(pruned["decode_rounds_s"]) == 2
    assert data["speedup"]["prefill_rounds"] == pytest.approx(
        [d / p for d, p in zip(dense["prefill_rounds_s"], pruned["prefill_rounds_s"], strict=True)]
    )
    code, _, err = run(
        capsys, "bench", "--dense", saved["base"], "--pruned", export, "--json", tmp_path / "bench.json"
    )
    assert_user_error(code, err, "bench.json exists", "--overwrite")
    assert json.loads((tmp_path / "bench.json").read_text()) == data


def test_bench_errors(saved, tmp_path, capsys):
    code, _, err = run(capsys, "bench", "--dense", saved["base"], "--pruned", tmp_path / "nope")
    assert_user_error(code, err, "--pruned", "no such directory")
    code, _, err = run(capsys, "bench", "--dense", saved["base"], "--pruned", saved["adapter"])
    assert_user_error(code, err, "--pruned", "config.json")
    code, _, err = run(
        capsys, "bench", "--dense", saved["base"], "--pruned", saved["base"], "--seq", 64, "--new-tokens", 8
    )
    assert_user_error(code, err, "exceed", "64 position")


# --------------------------------------------------------------------------------------------- latency


# transformers renamed the KV-cache argument to `cache`; decode must pass it under the name the model takes
@pytest.mark.filterwarnings("error:`past_key_values` is deprecated:FutureWarning")
def test_measure_latency_prefill_and_decode():
    torch.set_num_threads(1)
    model = tiny_model("llama").train()
    result = measure_latency(model, batch=2, seq_len=8, new_tokens=3, repeats=2, warmup=1)
    assert model.training  # restored
    assert len(result.prefill.samples_s) == 2 and len(result.decode.samples_s) == 2
    assert result.prefill_tokens_per_s == pytest.approx(16 / result.prefill.median_s)
    assert result.decode_tokens_per_s == pytest.approx(6 / result.decode.median_s)
    data = result.to_dict()
    assert data["decode_skipped"] is None and data["parameters"] == sum(p.numel() for p in model.parameters())
    json.dumps(data)


def test_measure_latency_encoder_and_bad_settings():
    result = measure_latency(tiny_model("bert"), batch=1, seq_len=8, repeats=1, warmup=0)
    assert result.decode is None and "not a generative model" in result.decode_skipped
    assert result.decode_tokens_per_s is None
    with pytest.raises(ValueError, match="exceed"):
        measure_latency(tiny_model("gpt2"), seq_len=60, new_tokens=8)
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(tiny_model("llama"), repeats=0)
    with pytest.raises(ValueError, match=r"new_tokens=-5 is invalid: use an integer >= 0 \(0: prefill"):
        measure_latency(tiny_model("llama"), new_tokens=-5)


def test_prefill_passes_use_cache_only_to_a_forward_that_takes_it():
    """BERT under transformers 4.x: the config has use_cache, the forward refuses it (prefill raised)."""
    from peft_gates.latency import measure_prefill

    class Encoder(torch.nn.Module):
        config = transformers.BertConfig()  # carries use_cache=True

        def forward(self, input_ids):  # no use_cache, no **kwargs
            return input_ids.float()

    assert measure_prefill(Encoder(), torch.zeros(1, 4, dtype=torch.long), repeats=1, warmup=0).median_s >= 0
    calls = []
    decoder = tiny_model("llama")
    decoder.register_forward_pre_hook(lambda _m, _a, kwargs: calls.append(kwargs), with_kwargs=True)
    measure_prefill(decoder, torch.zeros(1, 4, dtype=torch.long), repeats=1, warmup=0)
    assert calls and all(c["use_cache"] is False and c["logits_to_keep"] == 1 for c in calls)


def test_rotate_rounds_rotates_the_order_and_keeps_round_order():
    calls = []
    rounds_done = []
    timed = rotate_rounds(
        {"a": "A", "b": "B", "c": "C"},
        lambda model: calls.append(model) or f"{model}{len(calls)}",
        rounds=3,
        on_round=lambda: rounds_done.append(len(calls)),
    )
    assert calls == ["A", "B", "C", "B", "C", "A", "C", "A", "B"]  # each round starts one model later
    assert timed == {"a": ["A1", "A6", "A8"], "b": ["B2", "B4", "B9"], "c": ["C3", "C5", "C7"]}
    assert rounds_done == [3, 6, 9]
    with pytest.raises(ValueError, match=r"rounds=0 is invalid: time every model at least once"):
        rotate_rounds({"a": 1}, lambda m: m, rounds=0)
    with pytest.raises(ValueError, match="models is empty"):
        rotate_rounds({}, lambda m: m, rounds=1)


def test_compare_latency_keeps_the_fastest_round_of_each_model(monkeypatch):
    """Prefill and decode each keep their own fastest round; every round's median stays for the spread."""
    from peft_gates import latency

    medians = {  # per call, in call order: (prefill, decode) medians
        "dense": iter([(4.0, 9.0), (3.0, 10.0), (5.0, 8.0)]),
        "pruned": iter([(2.0, 6.0), (2.5, 5.0), (1.5, 7.0)]),
    }

    def fake_measure(model, *args, **kwargs):
        prefill, decode = next(medians[model.name])
        return latency.LatencyResult(
            batch=2, seq_len=4, new_tokens=1, repeats=1, warmup=0, device="cpu", dtype="float32",
            parameters=len(model.name), prefill=latency.TimingStats([prefill]),
            decode=latency.TimingStats([decode]),
        )  # fmt: skip

    monkeypatch.setattr(latency, "measure_latency", fake_measure)
    dense, pruned = torch.nn.Module(), torch.nn.Module()
    dense.name, pruned.name = "dense", "pruned"
    timed = latency.compare_latency({"dense": dense, "pruned": pruned}, rounds=3)
    assert timed["dense"].prefill.median_s == 3.0 and timed["dense"].decode.median_s == 8.0
    assert timed["pruned"].prefill.median_s == 1.5 and timed["pruned"].decode.median_s == 5.0
    assert timed["dense"].prefill_rounds_s == [4.0, 3.0, 5.0] and timed["pruned"].decode_rounds_s == [
        6.0,
        5.0,
        7.0,
    ]
    assert timed["dense"].to_dict()["rounds"] == 3
    speed = latency.speedups(timed["dense"], timed["pruned"])
    assert speed["prefill"] == 2.0 and speed["decode"] == 8.0 / 5.0
    assert speed["prefill_rounds"] == [2.0, 3.0 / 2.5, 5.0 / 1.5]
    assert speed["decode_rounds"] == [9.0 / 6.0, 2.0, 8.0 / 7.0]
    assert latency.speedup_text(speed["prefill"], speed["prefill_rounds"]) == "2.00x (rounds 1.20-3.33x)"
    assert latency.speedup_text(1.234, []) == latency.speedup_text(1.234, [1.234]) == "1.23x"
    single = dataclasses.replace(
        timed["pruned"], prefill_rounds_s=[], decode_rounds_s=[]
    )  # a plain measurement
    with pytest.raises(ValueError, match="3 rounds vs 0; compare results of one compare_latency call"):
        latency.speedups(timed["dense"], single)


def test_compare_latency_on_real_models_times_each_model_every_round():
    torch.set_num_threads(1)
    models = {"llama": tiny_model("llama"), "bert": tiny_model("bert")}
    timed = compare_latency(models, batch=1, seq_len=8, new_tokens=2, rounds=2, repeats=1, warmup=0)
    assert len(timed["llama"].prefill_rounds_s) == len(timed["llama"].decode_rounds_s) == 2
    assert timed["llama"].prefill.median_s == min(timed["llama"].prefill_rounds_s)
    assert timed["bert"].decode is None and timed["bert"].decode_rounds_s == []  # encoders: prefill only
    assert len(timed["bert"].prefill_rounds_s) == 2
