"""``GateConfig.sparsity_scope="global"``: one parameter budget shared by every layer.

The injected gradient must be exactly lambda times the autograd gradient of
``|sum_i w_i p_i / sum_i w_i - keep|`` with ``w_i`` the weights the merge removes when gate ``i`` closes;
those weights must be what the merge really removes, for every supported family; the reported
sparsity loss must be that term; and the budget must survive saving, loading and gradient checkpointing.
(ZeRO-3 with partitioned gates: tests/test_distributed.py.)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny import FAMILIES, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

import gate_setups as g  # noqa: E402

from peft_gates import GateConfig, gate_statistics, gates  # noqa: E402
from peft_gates.architectures import arch_spec, attention_shape  # noqa: E402
from peft_gates.pruning import plan_pruning  # noqa: E402
from peft_gates.training import gate_model_of, set_sparsity_step  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def expected_weights(model, placement: str) -> dict[str, float]:
    """Per-gate weights computed here from the tiny Llama's sizes, not by the library: parameter name ->
    weights one closed gate of that vector removes."""
    cfg = model.config
    hidden, head_dim = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    per_unit = cfg.num_attention_heads // cfg.num_key_value_heads
    out = {}
    for name, _ in model.named_parameters():
        if "peft_gates_" not in name:
            continue
        module = name.rsplit(".peft_gates_", 1)[0]
        if placement == "units":
            # neuron: a row of gate_proj and up_proj + a column of down_proj; attention unit: its query
            # heads' and one k and one v head's rows, and its column block of o_proj
            out[name] = 3 * hidden if module.endswith("down_proj") else hidden * head_dim * (2 * per_unit + 2)
        else:
            linear = model.get_submodule(module)
            out[name] = linear.in_features if "peft_gates_row" in name else linear.out_features
    return out


def global_term(model, weights: dict[str, float]) -> torch.Tensor:
    cfg = gate_model_of(model).peft_config["default"]
    params = {n: p for n, p in model.named_parameters() if n in weights}
    total = sum(weights[n] * p.numel() for n, p in params.items())
    mass = sum(weights[n] * gates.open_probability(p, cfg.sigma).sum() for n, p in params.items())
    return (mass / total - cfg.keep).abs()


@pytest.mark.parametrize("placement", ["units", "both"])
@pytest.mark.parametrize("ga,loss_scale", [(1, 1.0), (2, 1024.0)])
def test_injected_gradient_is_lambda_times_autograd_of_the_global_term(placement, ga, loss_scale):
    model = g.gated_model(placement=placement, sparsity_scope="global", target_sparsity=0.3).train()
    lam = model.peft_config["default"].sparsity_weight
    params = dict(model.named_parameters())
    injected = g.injected_sparsity_gradient(model, ga, loss_scale)
    weights = expected_weights(model, placement)
    names = sorted(weights)
    term_grads = torch.autograd.grad(lam * global_term(model, weights), [params[n] for n in names])
    expected = dict(zip(names, term_grads, strict=True))
    assert set(injected) == set(expected)
    for name, value in injected.items():
        torch.testing.assert_close(value, expected[name] * loss_scale / ga, rtol=1e-5, atol=1e-10)
    assert max(v.abs().max() for v in expected.values()) > 1e-5
    # the reported loss is the same term
    reported = gate_statistics(model, with_plan=False).sparsity_loss
    assert reported == pytest.approx(float(global_term(model, weights).detach()), rel=1e-5)


def test_global_gradient_differs_from_the_per_layer_one():
    """Negative control: at the same gates the two scopes push with different strengths per layer."""
    grads = {}
    for scope in ("layer", "global"):
        model = g.gated_model(placement="units", sparsity_scope=scope, target_sparsity=0.3).train()
        set_sparsity_step(model, 0)
        batch = {k: v[None] for k, v in g.RowsDataset(g.token_rows())[0].items()}
        (model(**batch).loss * 0).backward()  # the sparsity gradient alone
        grads[scope] = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "gates_col" in n])
    assert (grads["layer"] - grads["global"]).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_unit_weights_are_what_the_merge_removes(family):
    """Close one MLP neuron and one attention unit of block 0: the plan removes the weights the budget
    counts for them, plus the biases of their rows (which the budget leaves out)."""
    model = get_peft_model(tiny_model(family), GateConfig(placement="units", sparsity_scope="global"))
    tuner = gate_model_of(model)
    spec = arch_spec(model.config.model_type)
    shape = attention_shape(spec, model.config)
    closed = {}
    for name, layer in tuner.gated_layers("default").items():
        if re.search(r"\.0\.", name):  # block 0: its attention output and its MLP output
            with torch.no_grad():
                layer.gate_vectors("default")["columns"][0] = -3.0
            closed[name] = layer.budget_slots["default"]["columns"][1]
    assert len(closed) == 2
    block = tuner.model.get_submodule(next(iter(closed)).rsplit(".0.", 1)[0] + ".0")
    biases = 0
    for module in spec.attention_modules():  # q/k/v (or the fused qkv) biases of the unit's rows
        if block.get_submodule(module).bias is not None:
            rows = shape.heads_per_unit * shape.head_dim if module == spec.q else shape.head_dim
            biases += (shape.heads_per_unit + 2) * shape.head_dim if module == spec.qkv else rows
    for module in spec.mlp_rows:
        if block.get_submodule(module).bias is not None:
            biases += spec.fused_mlp_segments
    plan = plan_pruning(model, multiple_of=1)
    assert plan.params_removed == sum(closed.values()) + biases, (plan.params_removed, closed, biases)


def test_config_refuses_an_unknown_scope():
    with pytest.raises(ValueError, match="sparsity_scope='per-layer'.*'layer'.*'global'"):
        GateConfig(sparsity_scope="per-layer")


def test_global_scope_saves_and_loads(tmp_path):
    model = g.gated_model(placement="units", sparsity_scope="global")
    model.save_pretrained(tmp_path / "adapter")
    assert (
        json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["sparsity_scope"] == "global"
    )
    loaded = PeftModel.from_pretrained(g.tiny_llama(), tmp_path / "adapter", is_trainable=True)
    budget = gate_model_of(loaded).sparsity_coefficients["default"].budget
    assert (
        budget is not None
        and budget.total == gate_model_of(model).sparsity_coefficients["default"].budget.total
    )
    layer_scope = g.gated_model(placement="units")
    assert gate_model_of(layer_scope).sparsity_coefficients["default"].budget is None


def test_global_scope_forward_is_unchanged_at_eval():
    """The scope only changes the training gradient: eval outputs of the two scopes are identical."""
    batch = {k: v[None] for k, v in g.RowsDataset(g.token_rows())[0].items()}
    outs = [
        g.gated_model(placement="units", sparsity_scope=scope).eval()(**batch).logits
        for scope in ("layer", "global")
    ]
    torch.testing.assert_close(outs[0], outs[1])
