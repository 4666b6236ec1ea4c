"""Saving and loading a gate adapter like any PEFT adapter, in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny import tiny_inputs, tiny_model

from peft_gates import GateConfig


def _trained_adapter(tmp_path, placement="both"):
    """A saved base model and a saved adapter whose gates are no longer at their init."""
    base = tiny_model("llama")
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    base = type(base).from_pretrained(base_dir)
    model = get_peft_model(base, GateConfig(placement=placement))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "peft_gates_" in name:
                p.copy_(torch.linspace(-2.0, 1.5, p.numel()))
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    x = tiny_inputs()
    with torch.no_grad():
        logits = model.eval()(x).logits
    torch.save({"x": x, "logits": logits}, tmp_path / "expected.pt")
    return base_dir, adapter_dir


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)


@pytest.mark.parametrize("placement", ["both", "units"])
def test_fresh_process_reproduces_logits(tmp_path, placement):
    base_dir, adapter_dir = _trained_adapter(tmp_path, placement)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "PEFT_GATES"
    result = _run(
        f"""
        import torch
        import peft_gates
        from peft import AutoPeftModelForCausalLM, PeftModel
        from transformers import AutoModelForCausalLM

        expected = torch.load("{tmp_path}/expected.pt")
        base = AutoModelForCausalLM.from_pretrained("{base_dir}")
        for model in (
            PeftModel.from_pretrained(base, "{adapter_dir}"),
            AutoPeftModelForCausalLM.from_pretrained("{adapter_dir}"),
        ):
            with torch.no_grad():
                logits = model.eval()(expected["x"]).logits
            assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_fresh_process_without_import_names_the_package(tmp_path):
    base_dir, adapter_dir = _trained_adapter(tmp_path)
    result = _run(
        f"""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base_dir}"), "{adapter_dir}")
        """
    )
    assert result.returncode != 0
    assert "KeyError: 'PEFT_GATES'" in result.stderr


def test_loading_onto_other_shapes_fails_loudly(tmp_path):
    _, adapter_dir = _trained_adapter(tmp_path)
    other = tiny_model("llama", hidden_size=48, intermediate_size=64)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(other, adapter_dir)
