"""The pruning merge: plan, exact folding, removal of closed units, alignment, errors.

Tiny random models (2 blocks, hidden 32, MLP width 48, GQA where the family has it, explicit
head_dim != hidden / heads for Llama-style families). Gates are set directly: random fractional
values everywhere, then chosen neurons/units closed with theta = -2 (the "most open" of a fully
closed layer at theta = -1, so ``min_units`` has a defined choice).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from torch import nn
from torch.nn import functional as F

import peft_gates
from peft_gates.architectures import ARCHITECTURES, attention_shape, find_blocks
from peft_gates.export import register_pruned_architectures
from peft_gates.layer import GateLayer
from peft_gates.pruning import DEFAULT_MULTIPLE_OF, layer_widths, plan_pruning, prune_and_unload

register_pruned_architectures()

ARCHS = list(ARCHITECTURES)
ENCODERS = ("bert", "roberta")
VOCAB = 96
WIDTH = 48
CLOSED, MOST_OPEN_CLOSED = -2.0, -1.0


def tiny_config(model_type: str, **overrides) -> transformers.PretrainedConfig:
    """A 2-block config of ``model_type``: GQA (4 heads / 2 KV) and explicit head_dim where supported."""
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if model_type == "gpt2":
        kw = dict(n_embd=32, n_layer=2, n_head=4, n_inner=WIDTH, n_positions=64)
    elif model_type in ENCODERS:
        kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=WIDTH)
        kw["max_position_embeddings"] = 64
    else:
        kw = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=WIDTH, max_position_embeddings=64)
        kw.update(num_attention_heads=4, num_key_value_heads=2)
        if model_type != "phi3":
            kw["head_dim"] = 16
        if model_type in ("gemma2", "gemma3_text"):
            kw.update(query_pre_attn_scalar=16, sliding_window=16)
        if model_type in ("llama", "qwen3"):
            kw.update(attention_bias=True)
        if model_type == "llama":
            kw.update(mlp_bias=True)
    kw.update(overrides)
    return transformers.AutoConfig.for_model(model_type, vocab_size=VOCAB, **ids, **kw)


def auto_class(model_type: str, task: str = "lm"):
    if task == "seq_cls":
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModelForMaskedLM if model_type in ENCODERS else transformers.AutoModelForCausalLM


def tiny_model(model_type: str, task: str = "lm", seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return auto_class(model_type, task).from_config(tiny_config(model_type, **overrides)).eval()


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = max(1.0, expected.abs().max().item())
    assert (actual - expected).abs().max().item() <= 1e-4 * scale


def _theta(module: nn.Module, side: str) -> torch.Tensor:
    return module.gate_vectors("default")[side].data


def set_gates(peft_model: nn.Module, placement: str, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Random fractional gates, then chosen neurons/units closed; returns expected (kept neurons, kept units).

    Block 0: every 3rd neuron and the first unit closed (under ``"both"`` neurons are closed in turn
    through the gate row, the up row / second segment and the down column, the unit through its v
    rows; decoys that must NOT close anything: all q and k rows of the last unit, half the v rows
    of the second unit, residual-side columns of q and rows of attn_out). Block 1: everything
    closed (through down columns and attn_out columns), neuron 5 and unit 1 least closed, so
    ``min_units=1`` keeps exactly those.
    """
    generator = torch.Generator().manual_seed(seed)
    model = peft_model.base_model.model
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, GateLayer):
                for theta in module.gate_vectors("default").values():
                    theta.copy_(torch.rand(theta.shape, generator=generator) * 0.9 - 0.4)
    spec = ARCHITECTURES[model.config.model_type]
    shape = attention_shape(spec, model.config)
    _, blocks = find_blocks(model, spec)
    hd, uw, units = shape.head_dim, shape.unit_width, shape.num_units
    v_offset = (shape.num_heads + shape.num_kv_heads) * hd if spec.qkv else 0
    v_name, q_name = spec.qkv or spec.v, spec.qkv or spec.q
    k_offset = shape.num_heads * hd if spec.qkv else 0
    k_name = spec.qkv or spec.k
    with torch.no_grad():
        block = blocks[0]
        closed = [j for j in range(WIDTH) if j % 3 == 0]
        for n, j in enumerate(closed):
            route = n % 3 if placement == "both" else 2
            if route == 0:
                _theta(block.get_submodule(spec.mlp_rows[0]), "rows")[j] = CLOSED
            elif route == 1:
                last = block.get_submodule(spec.mlp_rows[-1])
                _theta(last, "rows")[j + (spec.fused_mlp_segments - 1) * WIDTH] = CLOSED
            else:
                _theta(block.get_submodule(spec.mlp_out), "columns")[j] = CLOSED
        if placement == "both":
            _theta(block.get_submodule(v_name), "rows")[v_offset : v_offset + hd] = CLOSED
            last_unit = units - 1
            q_rows = _theta(block.get_submodule(q_name), "rows")
            q_rows[last_unit * uw : (last_unit + 1) * uw] = CLOSED
            _theta(block.get_submodule(k_name), "rows")[
                k_offset + last_unit * hd : k_offset + (last_unit + 1) * hd
            ] = CLOSED
            _theta(block.get_submodule(v_name), "rows")[v_offset + hd : v_offset + hd + hd // 2] = CLOSED
            _theta(block.get_submodule(q_name), "columns")[:3] = CLOSED
            _theta(block.get_submodule(spec.attn_out), "rows")[:2] = CLOSED
        else:
            _theta(block.get_submodule(spec.attn_out), "columns")[0] = CLOSED
        kept0 = ([j for j in range(WIDTH) if j % 3], list(range(1, units)))

        block = blocks[1]
        down = _theta(block.get_submodule(spec.mlp_out), "columns")
        down.fill_(CLOSED)
        down[5] = MOST_OPEN_CLOSED
        out_cols = _theta(block.get_submodule(spec.attn_out), "columns")
        out_cols.fill_(CLOSED)
        group = block.get_submodule(spec.attn_out).column_group["default"]
        out_cols[uw // group : 2 * uw // group] = MOST_OPEN_CLOSED
    return [kept0, ([5], [1])]


def gated_model(
    model_type: str, placement: str, task: str = "lm", scale_gates: str = "none", lora_rank: int = 0
) -> tuple[nn.Module, list]:
    kwargs = {"task_type": "SEQ_CLS"} if task == "seq_cls" else {}
    config = peft_gates.GateConfig(
        placement=placement, scale_gates=scale_gates, lora_rank=lora_rank, **kwargs
    )
    peft_model = get_peft_model(tiny_model(model_type, task), config)
    expected = set_gates(peft_model, placement)
    return peft_model.eval(), expected


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


GATINGS = [("units", "none"), ("both", "none"), ("units", "both")]  # (placement, scale_gates)


@pytest.mark.parametrize(("placement", "scale_gates"), GATINGS)
@pytest.mark.parametrize("model_type", ARCHS)
def test_pruned_model_is_exact_and_smaller(model_type: str, placement: str, scale_gates: str) -> None:
    """With scale gates (fractional, on both sides of every block Linear) the scales fold into the kept
    weights (same logits) and change nothing in what is removed."""
    peft_model, expected = gated_model(model_type, placement, scale_gates=scale_gates)
    spec = ARCHITECTURES[model_type]
    if scale_gates != "none":
        block = find_blocks(peft_model.base_model.model, spec)[1][0]
        assert all(isinstance(block.get_submodule(name), GateLayer) for name in spec.block_linears())
    x = inputs()
    reference = logits(peft_model, x)
    plan = plan_pruning(peft_model, multiple_of=1)
    assert [(layer.kept_neurons, layer.kept_units) for layer in plan.layers] == expected
    pruned = prune_and_unload(peft_model, multiple_of=1)

    assert_close(logits(pruned, x), reference)
    assert n_params(pruned) == plan.params_total_after < plan.params_total_before
    assert not any(isinstance(m, GateLayer) for m in pruned.modules())
    assert not any("peft_gates" in name for name, _ in pruned.named_parameters())
    assert layer_widths(pruned) == plan.widths() == pruned.config.pruned_layers
    assert pruned.config.model_type == f"{model_type}_pruned"
    if placement == "both":
        zeroed = plan.layers[0].zeroed
        assert zeroed[spec.qkv or spec.q]["columns"] == 3  # residual-side columns fold in as zeros
        assert zeroed[spec.attn_out]["rows"] == 2


@pytest.mark.parametrize("model_type", ["bert", "roberta", "llama"])
def test_sequence_classification_keeps_trained_head(model_type: str) -> None:
    peft_model, _ = gated_model(model_type, "units", task="seq_cls")
    head = "classifier" if model_type in ENCODERS else "score"
    trained = peft_model.base_model.model.get_submodule(head).modules_to_save["default"]
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(0.5)
    x = inputs()
    reference = logits(peft_model, x)
    plan = plan_pruning(peft_model, multiple_of=1)
    pruned = prune_and_unload(peft_model, multiple_of=1)
    assert_close(logits(pruned, x), reference)
    assert n_params(pruned) == plan.params_total_after


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2", "bert"])
def test_alignment_keeps_multiples_and_exactness(model_type: str) -> None:
    peft_model, expected = gated_model(model_type, "both")
    x = inputs()
    reference = logits(peft_model, x)
    plan = plan_pruning(peft_model, multiple_of=16)
    widths = [w["intermediate_size"] for w in plan.widths()]
    assert widths == [32, 16]  # 32 open stays 32; 1 kept rounds up to 16
    assert set(expected[0][0]) <= set(plan.layers[0].kept_neurons)
    # block 1: neuron 5 first, then the most open of the rest (all theta -2: lowest indices)
    assert plan.layers[1].kept_neurons == list(range(16))
    pruned = prune_and_unload(peft_model, multiple_of=16)
    assert_close(logits(pruned, x), reference)
    assert [w["intermediate_size"] for w in layer_widths(pruned)] == widths


def test_alignment_is_capped_at_the_original_width() -> None:
    peft_model, _ = gated_model("llama", "units")
    plan = plan_pruning(peft_model)
    assert plan.multiple_of == DEFAULT_MULTIPLE_OF == 128
    assert [layer.widths()["intermediate_size"] for layer in plan.layers] == [WIDTH, WIDTH]
    assert [layer.kept_units for layer in plan.layers] == [[1], [1]]


@pytest.mark.parametrize("model_type", ["qwen2", "gpt2"])
def test_min_units_keeps_the_most_open(model_type: str) -> None:
    peft_model, _ = gated_model(model_type, "units")
    x = inputs()
    reference = logits(peft_model, x)
    plan = plan_pruning(peft_model, multiple_of=1, min_units=2)
    assert plan.layers[1].kept_units == [0, 1]  # unit 1 least closed, then the lowest index
    assert plan.layers[1].kept_neurons == [0, 5]
    pruned = prune_and_unload(peft_model, multiple_of=1, min_units=2)
    assert_close(logits(pruned, x), reference)


def test_plan_leaves_the_model_untouched_and_counts_flops() -> None:
    peft_model, _ = gated_model("mistral", "both")
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    plan = plan_pruning(peft_model, multiple_of=1, seq_len=10)
    after = peft_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    layer = plan.layers[1]
    assert layer.flops_before == 2 * layer.params_before + 4 * 16 * 10 * 4
    assert layer.flops_after == 2 * layer.params_after + 4 * 16 * 10 * 2
    data = plan.to_dict()
    assert data["layers"][1]["kept_heads"] == 2 and "kept_neurons" not in data["layers"][1]
    assert plan.to_dict(include_indices=True)["layers"][1]["kept_neurons"] == [5]


def test_closed_q_and_k_rows_never_close_a_head() -> None:
    peft_model = get_peft_model(tiny_model("llama"), peft_gates.GateConfig(placement="rows")).eval()
    attn = peft_model.base_model.model.model.layers[0].self_attn
    with torch.no_grad():
        _theta(attn.q_proj, "rows").fill_(CLOSED)
        _theta(attn.k_proj, "rows").fill_(CLOSED)
    plan = plan_pruning(peft_model, multiple_of=1)
    assert plan.layers[0].kept_units == [0, 1]
    assert plan.layers[0].zeroed["self_attn.q_proj"]["rows"] == 64
    x = inputs()
    reference = logits(peft_model, x)
    assert_close(logits(prune_and_unload(peft_model, multiple_of=1), x), reference)


def test_second_adapter_by_name() -> None:
    peft_model, _ = gated_model("llama", "units")
    peft_model.add_adapter("other", peft_gates.GateConfig(placement="units"))
    down = peft_model.base_model.model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        down.peft_gates_col["other"][:10] = CLOSED
    peft_model.set_adapter("other")
    x = inputs()
    reference = logits(peft_model, x)
    plan = plan_pruning(peft_model, adapter_name="other", multiple_of=1)
    assert plan.layers[0].kept_neurons == list(range(10, WIDTH))
    assert_close(logits(prune_and_unload(peft_model, adapter_name="other", multiple_of=1), x), reference)


def test_merge_and_unload_is_the_pruning_merge() -> None:
    peft_model, expected = gated_model("qwen2", "units")
    x = inputs()
    reference = logits(peft_model, x)
    merged = peft_model.merge_and_unload(multiple_of=1)
    assert_close(logits(merged, x), reference)
    assert [(w["intermediate_size"], w["num_key_value_heads"]) for w in layer_widths(merged)] == [
        (len(neurons), len(units)) for neurons, units in expected
    ]


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2"])
def test_generation_matches_after_pruning(model_type: str) -> None:
    peft_model, _ = gated_model(model_type, "units")
    x = inputs()[:, :4]
    with torch.no_grad():
        reference = peft_model.generate(input_ids=x, max_new_tokens=4, do_sample=False)
        pruned = prune_and_unload(peft_model, multiple_of=1)
        assert torch.equal(pruned.generate(input_ids=x, max_new_tokens=4, do_sample=False), reference)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"multiple_of": 0}, "multiple_of=0"),
        ({"min_units": 0}, "min_units=0"),
        ({"adapter_name": "nope"}, "adapter_name='nope' does not exist"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    peft_model, _ = gated_model("llama", "units")
    with pytest.raises(ValueError, match=match):
        plan_pruning(peft_model, **kwargs)
    with pytest.raises(ValueError, match=match):
        prune_and_unload(peft_model, **kwargs)


def test_lora_model_is_refused() -> None:
    lora = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(ValueError, match="LORA.*merge_and_unload"):
        prune_and_unload(lora)


def test_gate_statistics_count_what_the_merge_removes_at_its_multiple_of() -> None:
    peft_model, _ = gated_model("llama", "units")
    for multiple_of in (1, 16):
        stats = peft_gates.gate_statistics(peft_model, multiple_of=multiple_of)
        plan = plan_pruning(peft_model, multiple_of=multiple_of)
        assert stats.removable_parameters == plan.params_removed > 0
        line = f"removable by the merge (multiple_of={multiple_of}): {plan.params_removed:,}"
        assert line in stats.summary()
    rounded = peft_gates.gate_statistics(peft_model, multiple_of=16).removable_parameters
    assert rounded < peft_gates.gate_statistics(peft_model, multiple_of=1).removable_parameters


def test_a_model_without_its_familys_blocks_is_named() -> None:
    with pytest.raises(ValueError, match=r"no ModuleList named '\*layers' in Linear.*stock transformers"):
        find_blocks(nn.Linear(2, 2), ARCHITECTURES["llama"])


def test_a_dtype_given_as_a_string_is_refused() -> None:
    peft_model, _ = gated_model("llama", "units")
    with pytest.raises(
        TypeError, match="dtype='bfloat16' is invalid: pass a torch.dtype such as torch.bfloat16"
    ):
        prune_and_unload(peft_model, dtype="bfloat16")


def test_unmerged_lora_layers_under_gates_are_refused() -> None:
    base = inject_adapter_in_model(LoraConfig(target_modules=["q_proj"], r=2), tiny_model("llama"))
    peft_model = get_peft_model(base, peft_gates.GateConfig(placement="units"))
    with pytest.raises(ValueError, match="q_proj.*unmerged.*merge"):
        plan_pruning(peft_model)


def test_unknown_architecture_folds_with_a_warning(tmp_path) -> None:
    """A family without a table entry is folded, not cut, and saves (both layouts) as the stock model."""
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=WIDTH,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
    )
    peft_model = get_peft_model(
        transformers.OPTForCausalLM(config), peft_gates.GateConfig(placement="both")
    ).eval()
    for module in peft_model.modules():
        if isinstance(module, GateLayer):
            with torch.no_grad():
                module.peft_gates_row["default"][::4] = CLOSED
    x = inputs()
    reference = logits(peft_model, x)
    plan = plan_pruning(peft_model)
    assert not plan.supported and plan.params_total_after == plan.params_total_before and plan.other_zeroed
    with pytest.warns(UserWarning, match="model_type='opt'.*ArchSpec"):
        pruned = prune_and_unload(peft_model)
    assert_close(logits(pruned, x), reference)
    for layout in ("per_layer", "zero_pad"):
        peft_gates.save_pruned(pruned, tmp_path / layout, layout=layout, report=plan)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / layout).eval()
        assert type(reloaded) is transformers.OPTForCausalLM
        assert_close(logits(reloaded, x), reference)
    assert n_params(pruned) == plan.params_total_before


class FakeQuantLinear(nn.Module):
    """int8 weight + per-row scale: stands in for a bitsandbytes layer (not a float nn.Linear)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.detach().abs().amax(1, keepdim=True) / 127
        self.weight = nn.Parameter(
            (linear.weight.detach() / scale).round().to(torch.int8), requires_grad=False
        )
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.compute_dtype = torch.float32

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), self.bias)


def quantized_llama() -> nn.Module:
    model = tiny_model("llama")
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.model.layers.get_submodule(parent), child, FakeQuantLinear(module))
    return model


def test_quantized_base_without_a_dequantize_path_is_a_clear_error() -> None:
    from peft_gates.quantization import UnsupportedQuantizationError

    peft_model = get_peft_model(quantized_llama(), peft_gates.GateConfig(placement="units"))
    with pytest.raises(UnsupportedQuantizationError, match="FakeQuantLinear.*bitsandbytes 4-bit"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prune_and_unload(peft_model, multiple_of=1)


def test_bitsandbytes_4bit_base_prunes_exactly(tmp_path) -> None:
    from peft_gates.quantization import prepare_quantized_for_gates

    tiny_model("llama").save_pretrained(tmp_path)
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization, device_map="cpu", dtype=torch.float32
    )
    peft_model = get_peft_model(prepare_quantized_for_gates(base), peft_gates.GateConfig(placement="units"))
    expected = set_gates(peft_model, "units")
    x = inputs()
    reference = logits(peft_model.eval(), x)
    plan = plan_pruning(peft_model, multiple_of=1)
    pruned = prune_and_unload(peft_model, multiple_of=1)
    assert [(layer.kept_neurons, layer.kept_units) for layer in plan.layers] == expected
    assert all(type(m) is nn.Linear for m in pruned.model.layers.modules() if isinstance(m, nn.Linear))
    assert n_params(pruned) == plan.params_total_after
    assert_close(logits(pruned, x), reference)


def test_a_pruned_model_can_be_gated_and_pruned_again(tmp_path) -> None:
    peft_model, _ = gated_model("llama", "units")
    first = prune_and_unload(peft_model, multiple_of=1)
    again = get_peft_model(first, peft_gates.GateConfig(placement="units")).eval()
    with torch.no_grad():
        again.base_model.model.model.layers[0].mlp.down_proj.peft_gates_col["default"][:4] = CLOSED
    x = inputs()
    reference = logits(again, x)
    plan = plan_pruning(again, multiple_of=1)
    assert plan.layers[0].intermediate_size == 32 and len(plan.layers[0].kept_neurons) == 28
    assert plan.layers[1].num_units == 1 and plan.layers[1].kept_units == [0]
    second = prune_and_unload(again, multiple_of=1)
    assert_close(logits(second, x), reference)
    assert n_params(second) == plan.params_total_after
    assert [w["intermediate_size"] for w in second.config.pruned_layers] == [28, 1]
