"""Every example in examples/ runs end to end with ``--smoke`` (tiny random model, a few steps).

Each runs in its own subprocess, as a user would start it, with its outputs in a temporary directory
(``PEFT_GATES_SMOKE_DIR``); the checks look at what it wrote. The real runs (default, no ``--smoke``) use
the pretrained assets and take minutes; they are not part of the test suite.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
NOT_EXAMPLES = {"main_job.py"}  # the project's main job has its own test
EXPECTED = {
    "quickstart.py": ["gates-quickstart/adapter/adapter_config.json", "gates-quickstart/pruned/config.json"],
    "sft_trl.py": ["sft-gates/adapter/adapter_config.json", "sft-gates/pruned/compression_report.md"],
    "seq_cls_bert.py": ["cls-gates/pruned/config.json", "cls-gates/pruned/compression_report.json"],
    "quantized_4bit.py": ["gates-4bit/adapter/adapter_config.json", "gates-4bit/pruned/config.json"],
    "prune_and_export.py": [
        "exports/per_layer/config.json",
        "exports/zero_pad/config.json",
        "exports/report",
    ],
    "accelerate_loop.py": [
        "gates-accelerate/adapter/adapter_config.json",
        "gates-accelerate/pruned/config.json",
    ],
}
NEEDS = {"quantized_4bit.py": ["bitsandbytes", "trl"], "quickstart.py": ["trl"], "sft_trl.py": ["trl"]}


def _examples() -> list[str]:
    return sorted(
        p.name for p in EXAMPLES_DIR.glob("*.py") if not p.name.startswith("_") and p.name not in NOT_EXAMPLES
    )


def test_every_example_is_covered():
    assert _examples() == sorted(EXPECTED)


def _run(name: str, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PEFT_GATES_SMOKE_DIR=str(workdir), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=workdir,
    )


def _check_saved_models(root: Path) -> int:
    """Every model an example saved under ``root`` reloads through the Auto classes, runs, and has the
    parameter count its compression report (where one sits beside it) states. Returns how many."""
    import torch
    import transformers

    import peft_gates  # noqa: F401  (registers the pruned architectures, as a user's script does)

    checked = 0
    for config_path in sorted(root.glob("**/config.json")):
        folder = config_path.parent
        if not any(folder.glob("*.safetensors")):
            continue
        config = json.loads(config_path.read_text())
        architecture = config["architectures"][0]
        task = "SequenceClassification" if architecture.endswith("ForSequenceClassification") else "CausalLM"
        model = getattr(transformers, f"AutoModelFor{task}").from_pretrained(folder).eval()
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all(), folder
        report = folder / "compression_report.json"
        if report.exists():
            after = json.loads(report.read_text())["totals"]["params_model_after"]
            count = sum(p.numel() for p in model.parameters())
            if config["model_type"].endswith("_pruned"):  # per-layer layout: exactly the kept weights
                assert count == after, folder
            else:  # zero_pad layout: padded back to uniform widths
                assert count >= after, folder
        checked += 1
    return checked


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_smoke(name: str, tmp_path: Path):
    for module in NEEDS.get(name, []):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{name} needs {module}: pip install {module}")
    result = _run(name, tmp_path, "--smoke")
    assert result.returncode == 0, f"{name} --smoke failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    for path in EXPECTED[name]:
        assert (tmp_path / path).exists(), f"{name} did not write {path}"
    expected_models = sum(Path(path).name == "config.json" for path in EXPECTED[name])
    assert _check_saved_models(tmp_path) >= expected_models
    if name == "prune_and_export.py":
        # both layouts reproduce the gated logits; zero_pad is a stock config with uniform widths
        assert result.stdout.count("max |logit - gated| 0.0e+00") == 2, result.stdout
        assert json.loads((tmp_path / "exports/zero_pad/config.json").read_text())["model_type"] == "llama"
        assert (
            json.loads((tmp_path / "exports/per_layer/config.json").read_text())["model_type"]
            == "llama_pruned"
        )
    if name == "quantized_4bit.py":  # the pruned model is saved dense: no re-quantization on reload
        assert "quantization_config" not in json.loads(
            (tmp_path / "gates-4bit/pruned/config.json").read_text()
        )
    if name == "quickstart.py":
        assert "parameters after pruning" in result.stdout


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_help_mentions_smoke(name: str):
    text = (EXAMPLES_DIR / name).read_text()
    assert '"--smoke"' in text and text.startswith('"""'), f"{name}: needs a docstring and a --smoke flag"


def test_seq_cls_run_too_short_for_the_sparsity_term_is_refused(tmp_path: Path):
    """300 sentences x 2 epochs of batch 32 end at step 20, when the sparsity term would start."""
    result = _run("seq_cls_bert.py", tmp_path, "--train-size", "300")
    assert result.returncode == 2
    assert "is 20 steps of batch 32, not more than the 20 before the sparsity term starts" in result.stderr
