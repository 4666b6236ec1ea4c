"""The PEFT tuner: wrapping, identity at init, trainable parameters, adapters API, bad input."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import ENCODERS, FAMILIES, tiny_inputs, tiny_model

import peft_gates
from peft_gates import GateConfig
from peft_gates.layer import GateLayer


def _gate_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "peft_gates_" in n}


PLACEMENTS = [("both", "none"), ("units", "none"), ("units", "both")]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("placement", "scale_gates"), PLACEMENTS)
def test_fresh_wrap_equals_base(family, placement, scale_gates):
    base = tiny_model(family)
    x = tiny_inputs()
    with torch.no_grad():
        ref = base(x).logits
    kwargs = {"modules_to_save": ["classifier"]} if family in ENCODERS else {}
    config = GateConfig(placement=placement, scale_gates=scale_gates, **kwargs)
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)
    assert any(isinstance(m, GateLayer) for m in model.modules())


def test_trainable_parameters_are_the_gates_only():
    model = get_peft_model(tiny_model("llama"), GateConfig(target_modules="all-linear"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(_gate_params(model))
    # rows + columns of every Linear but lm_head: 1/r of a rank-r LoRA on the same modules
    lora = get_peft_model(tiny_model("llama"), LoraConfig(target_modules="all-linear", r=1))
    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert sum(p.numel() for p in _gate_params(model).values()) == n_lora


def test_seq_cls_trains_head_through_modules_to_save():
    model = get_peft_model(
        tiny_model("bert"), GateConfig(task_type="SEQ_CLS", modules_to_save=["classifier"], bias="all")
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    assert any(n.endswith(".bias") for n in trainable)
    assert not any("word_embeddings" in n for n in trainable)


def test_units_placement_targets_removable_units():
    model = get_peft_model(tiny_model("llama"), GateConfig(placement="units"))
    cfg = model.peft_config["default"]
    assert cfg.target_modules == {"mlp.down_proj", "self_attn.o_proj"}
    layer = model.base_model.model.model.layers[0]
    # 4 heads / 2 KV heads, head_dim 8: one gate per KV group of 2 heads = 16 columns of o_proj
    assert layer.self_attn.o_proj.peft_gates_col["default"].numel() == 2
    assert layer.mlp.down_proj.peft_gates_col["default"].numel() == 48
    assert "default" not in layer.mlp.down_proj.peft_gates_row


def test_scale_gates_sit_outside_the_sparsity_term():
    """placement='units' + scale_gates='both': every block Linear gets row and column gates, but only the
    unit gates (down_proj columns, grouped o_proj columns) receive the sparsity gradient or count in the
    realized sparsity."""
    model = get_peft_model(
        tiny_model("llama"), GateConfig(placement="units", scale_gates="both", sparsity_weight=50.0)
    )
    cfg = model.peft_config["default"]
    assert cfg.column_group_size == {"mlp.down_proj": 1, "self_attn.o_proj": 16}
    block = model.base_model.model.model.layers[0]
    unit_modules = {"mlp.down_proj", "self_attn.o_proj"}
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):  # fmt: skip
        layer = block.get_submodule(name)
        assert set(layer.gate_vectors("default")) == {"rows", "columns"}, name
        assert layer.regularized["default"] == (("columns",) if name in unit_modules else ()), name
    assert block.self_attn.o_proj.peft_gates_col["default"].numel() == 2  # KV groups, as without scales
    # one sparsity term per unit module: 2 per block
    assert model.base_model.sparsity_coefficients["default"].num_terms == 4

    model.train()
    (0.0 * model(tiny_inputs()).logits.sum()).backward()  # no task gradient: only the injected one
    for name, p in model.named_parameters():
        if "peft_gates_" not in name:
            continue
        is_unit = "peft_gates_col" in name and any(u in name for u in unit_modules)
        assert (p.grad.abs().sum() > 0) == is_unit, name

    with torch.no_grad():
        block.self_attn.q_proj.peft_gates_row["default"].fill_(-3.0)  # a closed scale gate
        block.mlp.down_proj.peft_gates_col["default"][:12].fill_(-3.0)  # 12 closed neurons
    stats = peft_gates.gate_statistics(model)
    n_unit_gates = 2 * (48 + 2)
    assert stats.closed_gates == 12
    assert stats.realized_sparsity == pytest.approx(12 / n_unit_gates)
    assert stats.scale_gates == stats.num_gates - n_unit_gates
    assert "scale gates" in stats.summary()


def test_scale_gates_reload_without_re_resolving(tmp_path):
    """The saved config (units resolved, block Linears as targets) loads back to the same layers."""
    from peft import PeftModel

    model = get_peft_model(tiny_model("llama"), GateConfig(placement="units", scale_gates="rows"))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    before = {n: p.shape for n, p in model.named_parameters() if "peft_gates_" in n}
    after = {n: p.shape for n, p in loaded.named_parameters() if "peft_gates_" in n}
    assert before == after
    down = loaded.base_model.model.model.layers[0].mlp.down_proj
    assert set(down.gate_vectors("default")) == {"rows", "columns"}
    assert down.regularized["default"] == ("columns",)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_keeps_fp32_gates(dtype):
    base = tiny_model("llama").to(dtype)
    model = get_peft_model(base, GateConfig())
    assert all(p.dtype == torch.float32 for p in _gate_params(model).values())
    model.train()
    out = model(tiny_inputs(), labels=tiny_inputs())
    assert out.logits.dtype == dtype
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in _gate_params(model).values())


def test_multiple_adapters_set_disable_delete():
    base = tiny_model("llama")
    x = tiny_inputs()
    with torch.no_grad():
        ref = base(x).logits
    model = get_peft_model(base, GateConfig(placement="rows"))
    model.add_adapter("other", GateConfig(placement="rows"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("peft_gates_row.other"):
                p[: p.numel() // 2] = -2.0
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref)  # "default" active, still open
        model.set_adapter("other")
        changed = model(x).logits
        assert not torch.allclose(changed, ref)
        with model.disable_adapter():
            torch.testing.assert_close(model(x).logits, ref)
        torch.testing.assert_close(model(x).logits, changed)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in _gate_params(model) if n.endswith(".other")
    }
    model.delete_adapter("other")
    assert not any(n.endswith(".other") for n in _gate_params(model))
    assert "other" not in model.base_model.sparsity_coefficients


def test_two_active_adapters_on_different_modules_train_and_merge():
    """Each layer applies the active adapters it carries (as PEFT's LoRA does); merging names only
    adapters the model has, and an empty list merges none."""
    base = tiny_model("llama")
    x = tiny_inputs()
    model = get_peft_model(base, GateConfig(placement="rows", target_modules=["q_proj"]))
    model.add_adapter("mlp", GateConfig(placement="rows", target_modules=["down_proj"]))
    model.base_model.set_adapter(["default", "mlp"])
    model.train()
    model(x, labels=x).loss.backward()  # a layer with one of the two adapters used to raise KeyError
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.endswith("peft_gates_row.default") for n in grads)
    assert any(n.endswith("peft_gates_row.mlp") for n in grads)
    model.eval()
    with pytest.raises(ValueError, match=r"names \['typo'\], not adapters.*\['default', 'mlp'\]"):
        model.base_model.merge_adapter(["typo"])
    model.base_model.merge_adapter([])
    assert not any(m.merged for m in model.modules() if isinstance(m, GateLayer))


def test_training_moves_toward_target_and_lambda_zero_closes_nothing():
    """AdamW at lr 1e-2 for 120 steps: lambda=50 closes about half the gates, lambda=0 none."""

    def run(weight: float):
        torch.manual_seed(0)
        model = get_peft_model(
            tiny_model("llama"), GateConfig(placement="both", target_sparsity=0.5, sparsity_weight=weight)
        )
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0)
        x = tiny_inputs(batch=4, seq=12)
        model.train()
        for _ in range(120):
            opt.zero_grad()
            model(x, labels=x).loss.backward()
            opt.step()
        return peft_gates.gate_statistics(model, with_plan=False)

    stats = run(50.0)
    assert stats.realized_sparsity > 0.4  # target 0.5 of the open-probability mass
    assert stats.sparsity_loss < 0.05
    none = run(0.0)
    assert none.closed_gates == 0


def test_config_rejects_bad_values():
    cases = {
        "target_sparsity": 1.0,
        "sparsity_weight": -1.0,
        "init_std": -0.1,
        "noise_std": -0.1,
        "sigma": 0.0,
        "placement": "diagonal",
        "column_group_size": 0,
        "sparsity_start_step": -3,
        "recovery_start_step": -1,
        "bias": "lora_only",
        "scale_gates": "diagonal",
    }
    for field, value in cases.items():
        with pytest.raises(ValueError, match=f"GateConfig.{field}"):
            GateConfig(**{field: value})


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("sparsity_weight", "1e2", "not a str .*YAML.*100.0"),  # PyYAML reads 1e2 as a string
        ("target_sparsity", "0.5", "not a str"),
        ("lora_alpha", None, "not a NoneType"),
        ("init_mean", True, "not a bool"),
        ("sparsity_weight", float("nan"), "finite"),
        ("sigma", float("inf"), "finite"),
        ("init_std", float("inf"), "finite"),
        ("init_mean", float("nan"), "finite"),
    ],
)
def test_config_rejects_non_numbers_naming_the_field(field, value, says):
    """A string from a YAML/argparse config or a NaN would otherwise fail with a bare TypeError, or pass
    and turn every gate gradient into NaN."""
    with pytest.raises(ValueError, match=f"GateConfig.{field}=.*{says}"):
        GateConfig(**{field: value})


def test_config_accepts_numpy_numbers():
    np = pytest.importorskip("numpy")
    assert GateConfig(sparsity_weight=np.float32(10.0), target_sparsity=np.float64(0.4)).keep == 0.6


def test_column_groups_refused_where_they_would_be_ignored():
    with pytest.raises(ValueError, match="column_group_size=8.*placement='rows' has none"):
        GateConfig(placement="rows", column_group_size=8)
    with pytest.raises(ValueError, match="column_group_size=True"):
        GateConfig(column_group_size=True)
    with pytest.raises(ValueError, match=r"column_group_size=64 is set by placement='units'.*default 1"):
        get_peft_model(tiny_model("llama"), GateConfig(placement="units", column_group_size=64))
    with pytest.raises(ValueError, match=r"names \['o_prj'\], which match\(es\) no gated module.*o_proj"):
        get_peft_model(tiny_model("llama"), GateConfig(column_group_size={"o_prj": 8}))


def test_a_units_config_filled_in_for_one_family_is_refused_on_another():
    """``get_peft_model`` writes the unit modules into the config (as PEFT does with target_modules), so
    the same object on another family names modules that family does not have: say so."""
    config = GateConfig(placement="units")
    get_peft_model(tiny_model("llama"), config)
    with pytest.raises(ValueError, match="column_group_size=.*already filled in.*fresh GateConfig"):
        get_peft_model(tiny_model("gpt2"), config)
    again = get_peft_model(tiny_model("llama"), config)  # the same family takes it as it is
    assert again.peft_config["default"].column_group_size == config.column_group_size


def test_recovery_must_start_after_the_sparsity_term():
    with pytest.raises(ValueError, match="recovery_start_step=5 .*sparsity_start_step=5.*0 for no"):
        GateConfig(sparsity_start_step=5, recovery_start_step=5)
    assert GateConfig(sparsity_start_step=5, recovery_start_step=6).lambda_at(6) == 0.0


def test_scale_gates_need_the_units_placement():
    with pytest.raises(ValueError, match="GateConfig.scale_gates='rows'.*placement='units'"):
        GateConfig(placement="both", scale_gates="rows")


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="column_group_size=5"):
        get_peft_model(tiny_model("llama"), GateConfig(column_group_size={"o_proj": 5}))


def test_target_modules_matching_nothing_or_non_linear():
    with pytest.raises(ValueError, match="no_such_module"):
        get_peft_model(tiny_model("llama"), GateConfig(target_modules=["no_such_module"]))
    with pytest.raises(ValueError, match="embed_tokens.*Embedding"):
        get_peft_model(tiny_model("llama"), GateConfig(target_modules=["embed_tokens"]))


def test_units_target_modules_name_one_unit_output_each():
    """Naming one unit output gates only it; on BERT, whose MLP output name ``output.dense`` is the tail of
    ``attention.output.dense``, the heads can be named alone and the ambiguous MLP name is refused."""

    def unit_modules(family: str, targets: list[str]) -> set[str]:
        model = get_peft_model(tiny_model(family), GateConfig(placement="units", target_modules=targets))
        return {
            n.split(".peft_gates_col")[0].split(".0.", 1)[1]
            for n, _ in model.named_parameters()
            if ".0." in n and "peft_gates_col" in n
        }

    assert unit_modules("llama", ["down_proj"]) == {"mlp.down_proj"}
    assert unit_modules("llama", ["o_proj"]) == {"self_attn.o_proj"}
    assert unit_modules("bert", ["attention.output.dense"]) == {"attention.output.dense"}
    assert unit_modules("bert", ["attention.output.dense", "output.dense"]) == {
        "attention.output.dense",
        "output.dense",
    }
    with pytest.raises(ValueError, match="'output.dense', which 'attention.output.dense' also ends with"):
        unit_modules("bert", ["output.dense"])
    with pytest.raises(ValueError, match="'dense' names \\['attention.output.dense', 'output.dense'\\]"):
        unit_modules("bert", ["dense"])


def test_units_placement_rejects_unknown_architecture_and_non_units():
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(
        OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=1, num_attention_heads=4)
    )
    with pytest.raises(ValueError, match="model_type='opt'"):
        get_peft_model(opt, GateConfig(placement="units"))
    with pytest.raises(ValueError, match="q_proj"):
        get_peft_model(tiny_model("llama"), GateConfig(placement="units", target_modules=["q_proj"]))
