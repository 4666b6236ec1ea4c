"""Gates on bitsandbytes 4-bit / 8-bit bases (CPU): dequantization, training, merge, TRL, re-quantization.

Models are tiny random Llamas saved with ``save_pretrained`` and loaded back with
``from_pretrained(..., quantization_config=BitsAndBytesConfig(...), device_map="cpu")``, the user's path.
Measured bounds (see integrations/quantized/README.md) are asserted with a margin of about 10-50x.
"""

from __future__ import annotations

import copy
import json
import math
import os

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import _convert_weight_packed_for_cpu  # noqa: E402
from peft import get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from peft_gates import GateConfig, GateLayer
from peft_gates.quantization import (
    UnsupportedQuantizationError,
    dequantize_weight,
    disable_cpu_repacking,
    is_quantized_linear,
    mark_dequantized,
    prepare_quantized_for_gates,
    quantization_backend,
    requantize,
)

VOCAB = 96
QUANT = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    # the ZeRO-3 / FSDP set-up: 4-bit codes stored in bf16 tensors, bf16 compute
    "nf4-bf16-storage": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_storage=torch.bfloat16,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
    "int8": dict(load_in_8bit=True),
}
# Logit bounds, gated quantized forward vs merged dense model (relative L2). Measured: fp32 compute
# <= 1.7e-7 (fold order only); bf16 compute <= 4.5e-3 (bf16 activations); LLM.int8 eval-mode matmul
# <= 5.4e-3 (it also quantizes activations; its training-mode matmul is exact).
BOUND = {"nf4-dq": 1e-5, "fp4-dq": 1e-5, "nf4-bf16-storage": 3e-2, "int8": 3e-2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: one thread is ~10x faster than two on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random Llama on disk; widths divisible by the 4-bit block size (64) and by 32 (CPU packing)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_quantized(path, name: str) -> nn.Module:
    kwargs = QUANT[name]
    dtype = torch.bfloat16 if kwargs.get("bnb_4bit_compute_dtype") == torch.bfloat16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(**kwargs), device_map="cpu", dtype=dtype
    )
    return prepare_quantized_for_gates(model)


def batch(seed: int = 1, size: tuple[int, int] = (4, 16)) -> torch.Tensor:
    return torch.randint(2, VOCAB, size, generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: 4-bit codes kept in bf16 tensors contain NaN bit patterns, unequal to themselves."""
    view = lambda t: t.detach().contiguous().view(torch.uint8)  # noqa: E731
    return a.shape == b.shape and torch.equal(view(a), view(b))


def gate_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "peft_gates_" in n}


def fold_dense(peft_model: nn.Module) -> nn.Module:
    """Reference merge without pruning: dequantize every quantized Linear, fold the eval gates, unload.

    Independent of peft_gates.pruning, so a bug there and here would have to agree to go unnoticed.
    """
    tuner = peft_model.base_model
    for layer in [m for m in tuner.model.modules() if isinstance(m, GateLayer)]:
        base = layer.get_base_layer()
        z_row, z_col = layer.eval_gates(layer.active_adapters[0])
        weight = dequantize_weight(base)
        weight = (
            weight
            * (z_row[:, None] if z_row is not None else 1)
            * (z_col[None, :] if z_col is not None else 1)
        )
        bias = None if base.bias is None else base.bias.detach().float() * (z_row if z_row is not None else 1)
        layer.base_layer = _dense_linear(base, weight, bias)
    model = tuner.unload()
    for name, module in list(model.named_modules()):
        if is_quantized_linear(module):
            bias = None if module.bias is None else module.bias.detach().float()
            parent, _, child = name.rpartition(".")
            setattr(
                model.get_submodule(parent), child, _dense_linear(module, dequantize_weight(module), bias)
            )
    return mark_dequantized(model)


def _dense_linear(base: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    dtype = getattr(base, "compute_dtype", None) or torch.float32
    new = nn.Linear(base.in_features, base.out_features, bias=bias is not None, dtype=dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


# ---------------------------------------------------------------------------------------- dequantization


@pytest.mark.parametrize("name", list(QUANT))
def test_dequantized_weight_is_what_the_quantized_forward_multiplies_by(base_dir, name):
    model = load_quantized(base_dir, name)
    float_model = LlamaForCausalLM.from_pretrained(base_dir)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(0))
    for layer_name, module in model.named_modules():
        if not is_quantized_linear(module):
            continue
        weight = dequantize_weight(module)
        assert weight.dtype == torch.float32 and weight.shape == (module.out_features, module.in_features)
        original = float_model.get_submodule(layer_name).weight
        assert rel(weight, original) < (0.15 if "4" in name else 0.02)  # the quantization error itself
        weight.mul_(0)  # a fresh tensor: scaling it must not touch the layer
        assert dequantize_weight(module).abs().sum() > 0
    layer = model.model.layers[0].mlp.down_proj
    layer.train()  # LLM.int8's eval-mode matmul also quantizes activations; 4-bit is the same either way
    weight = dequantize_weight(layer)
    inputs = x.to(getattr(layer, "compute_dtype", None) or torch.float32)
    for requires_grad in (True, False):
        out = layer(inputs.clone().requires_grad_(requires_grad))
        expected = torch.nn.functional.linear(inputs, weight.to(inputs.dtype))
        if name == "nf4-bf16-storage":  # bf16 compute: same matrix, bf16 products
            assert rel(out, expected) < 1e-2
        else:  # bitwise the same fp32 matrix multiply
            torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_dequantize_float_layers_and_wrappers():
    linear = nn.Linear(6, 4).to(torch.bfloat16)
    weight = dequantize_weight(linear)
    assert weight.dtype == torch.float32 and torch.equal(weight, linear.weight.float())
    assert weight.data_ptr() != linear.weight.data_ptr()
    conv = Conv1D(4, 6)  # GPT-2: weight stored (in, out)
    torch.testing.assert_close(dequantize_weight(conv), conv.weight.T, rtol=0, atol=0)
    assert not is_quantized_linear(linear) and not is_quantized_linear(conv)
    assert not is_quantized_linear(nn.Embedding(4, 4)) and not is_quantized_linear(nn.Sequential())
    wrapped = get_peft_model(nn.Sequential(nn.Linear(6, 4)), GateConfig(target_modules=["0"]))
    gate_layer = next(m for m in wrapped.modules() if isinstance(m, GateLayer))
    torch.testing.assert_close(dequantize_weight(gate_layer), gate_layer.get_base_layer().weight.float())


def _fake_layer(module_path: str, **tensors) -> nn.Module:
    cls = type("QuantLinear", (nn.Module,), {"__module__": module_path})
    layer = cls()
    layer.in_features, layer.out_features = 8, 4
    for key, value in tensors.items():
        layer.register_buffer(key, value)
    return layer


@pytest.mark.parametrize(
    "layer, backend",
    [
        (_fake_layer("auto_gptq.nn_modules.qlinear", qweight=torch.zeros(1, 4, dtype=torch.int32)), "GPTQ"),
        (_fake_layer("gptqmodel.nn_modules.qlinear", qweight=torch.zeros(1, 4, dtype=torch.int32)), "GPTQ"),
        (_fake_layer("awq.modules.linear.gemm", qweight=torch.zeros(1, 4, dtype=torch.int32)), "AWQ"),
        (_fake_layer("hqq.core.quantize", W_q=torch.zeros(4, 4, dtype=torch.uint8)), "HQQ"),
        (_fake_layer("my_vendored.hqq_copy", W_q=torch.zeros(4, 4, dtype=torch.uint8)), "HQQ"),
        (_fake_layer("some.new.lib", weight=torch.zeros(4, 8, dtype=torch.int8)), "unknown"),
        (_fake_layer("some.new.lib", qweight=torch.zeros(4, 8, dtype=torch.int32)), "unknown"),
        (_fake_layer("transformers.integrations.finegrained_fp8", weight=torch.zeros(4, 8)), "fp8"),
    ],
    ids=["auto-gptq", "gptqmodel", "awq", "hqq", "hqq-vendored", "int8-weight", "qweight", "fp8"],
)
def test_unsupported_quantization_fails_loudly(layer, backend):
    if backend == "fp8":
        layer.weight = layer.weight.to(torch.float8_e4m3fn)
    assert is_quantized_linear(layer)
    assert backend in quantization_backend(layer)
    with pytest.raises(UnsupportedQuantizationError) as err:
        dequantize_weight(layer)
    message = str(err.value)
    assert backend in message and "bitsandbytes 4-bit" in message and "bitsandbytes 8-bit" in message


def test_torchao_weight_subclass_is_refused():
    cls = type(
        "AffineQuantizedTensor", (torch.Tensor,), {"__module__": "torchao.dtypes.affine_quantized_tensor"}
    )
    layer = nn.Linear(8, 4)
    layer.weight = nn.Parameter(torch.zeros(4, 8).as_subclass(cls), requires_grad=False)
    assert quantization_backend(layer) == "torchao"
    with pytest.raises(UnsupportedQuantizationError, match="torchao"):
        dequantize_weight(layer)


# ------------------------------------------------------------------------- the AVX512-BF16 CPU repacking trap


def _repack(layer: nn.Module) -> None:
    """What Linear4bit.forward does on an AVX512-BF16 CPU in eval mode with an input not requiring grad."""
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )


@pytest.mark.parametrize("name", ["nf4-dq", "fp4-dq", "nf4-bf16-storage"])
def test_cpu_repacked_weights_dequantize_and_restore_exactly(base_dir, name):
    model = load_quantized(base_dir, name)
    layer = model.model.layers[0].mlp.down_proj
    original = dequantize_weight(layer)
    _repack(layer)
    packed = dequantize_weight(layer)
    assert rel(packed, original) < 3e-3  # the repacking rounds the block scales to bf16: ~1.5e-3
    assert disable_cpu_repacking(model) == 1
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert layer.weight.dtype == QUANT[name].get("bnb_4bit_quant_storage", torch.uint8)
    torch.testing.assert_close(dequantize_weight(layer), packed, rtol=0, atol=0)  # codes come back exactly
    x = torch.randn(2, 128, dtype=layer.compute_dtype or torch.float32, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_prepare_switches_the_repacking_off(base_dir):
    for prepared in (False, True):
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=BitsAndBytesConfig(**QUANT["nf4-dq"]), device_map="cpu"
        )
        layers = [m for m in model.modules() if is_quantized_linear(m)]
        for layer in layers:  # behave as on an AVX512-BF16 CPU
            layer.support_avx512bf16_for_cpu = True
        if prepared:
            prepare_quantized_for_gates(model)
        layer = model.model.layers[0].mlp.down_proj
        layer.eval()
        try:
            with torch.no_grad():
                layer(torch.randn(2, 128))
        except Exception:  # the packed kernel may not exist on this CPU; the repacking happened before it
            pass
        assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False) == (not prepared)


def test_gates_keep_their_gradient_after_an_eval_forward_on_avx512bf16(base_dir):
    """Runs on any CPU: the layers are told they sit on an AVX512-BF16 CPU, as bitsandbytes sets it there."""
    base = load_quantized(base_dir, "nf4-dq")
    layers = [m for m in base.modules() if is_quantized_linear(m)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    model = get_peft_model(base, GateConfig(init_mean=0.0, sparsity_weight=0.0))
    x = batch()
    model.eval()
    with torch.no_grad():  # unprepared, this forward repacks every 4-bit weight into the no-backward layout
        model(input_ids=x)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate_params(model).values())


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("name", list(QUANT))
def test_gates_train_on_a_quantized_base(base_dir, name):
    model = load_quantized(base_dir, name)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    # init_mean 0.3: gates start inside (0, 1), where the task gradient is not clipped (the paper's init
    # starts them saturated at 1, with zero task gradient until the sparsity term pulls them in)
    model = get_peft_model(model, GateConfig(sparsity_weight=0.5, target_sparsity=0.3, init_mean=0.3))
    gates = gate_params(model)
    assert gates and {p.dtype for p in gates.values()} == {torch.float32}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(gates)
    x = batch()

    # 1) the task gradient reaches every gate vector through the quantized matmuls (sparsity term off)
    coefficient = model.base_model.sparsity_coefficients["default"]
    coefficient.weight = 0.0
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    no_grad = [n for n, p in gates.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"no task gradient reached {no_grad}"
    coefficient.weight = 0.5
    model.zero_grad()

    # 2) ~20 steps on a fixed batch with lambda > 0: the loss falls
    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(input_ids=x, labels=x).loss.item()

    start = eval_loss()
    optimizer = torch.optim.Adam(gates.values(), lr=0.1)
    losses = []
    model.train()
    for _ in range(20):
        optimizer.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    end = eval_loss()
    assert end < start - 5e-3, (start, end)
    assert sum(losses[-3:]) < sum(losses[:3])
    assert {p.dtype for p in gates.values()} == {torch.float32}
    for n, p in model.base_model.model.named_parameters():  # the quantized base did not move
        key = n.replace(".base_layer", "")
        if key in frozen:
            assert same_bits(p, frozen[key]), n


# --------------------------------------------------------------------------------------------------- merge


def _gated(base_dir, name: str, placement: str) -> nn.Module:
    torch.manual_seed(0)
    # broad init: some gates closed (removable units), many fractional, some open, as after training
    config = GateConfig(placement=placement, init_mean=0.3, init_std=1.0, noise_std=0.0)
    return get_peft_model(load_quantized(base_dir, name), config)


@pytest.mark.parametrize("placement", ["both", "units"])
@pytest.mark.parametrize("name", list(QUANT))
def test_dequantize_and_fold_matches_the_gated_quantized_forward(base_dir, name, placement):
    model = _gated(base_dir, name, placement)
    x = batch()
    model.eval()
    with torch.no_grad():
        gated = model(input_ids=x).logits
        model.train()  # noise_std=0: the same gates; int8 then uses its dequantize-and-matmul path
        gated_train = model(input_ids=x).logits
    dense = fold_dense(model).eval()
    assert not any(is_quantized_linear(m) for m in dense.modules())
    with torch.no_grad():
        merged = dense(input_ids=x).logits
    assert rel(gated, merged) < BOUND[name]
    if name in ("nf4-dq", "fp4-dq", "int8"):
        assert rel(gated_train, merged) < 1e-5


@pytest.mark.parametrize("placement", ["both", "units"])
@pytest.mark.parametrize("name", QUANT)
def test_prune_and_unload_matches_the_gated_quantized_forward(base_dir, name, placement):
    from peft_gates import pruning

    model = _gated(base_dir, name, placement)
    x = batch()
    model.eval()
    with torch.no_grad():
        gated = model(input_ids=x).logits
    n_base = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    pruned = pruning.prune_and_unload(model, multiple_of=1).eval()
    assert not any(is_quantized_linear(m) for m in pruned.modules())
    n_pruned = sum(m.weight.numel() for m in pruned.modules() if isinstance(m, nn.Linear))
    assert n_pruned < n_base  # closed units were cut out
    with torch.no_grad():
        merged = pruned(input_ids=x).logits
    assert rel(gated, merged) < BOUND[name]


@pytest.mark.parametrize("name", QUANT)
def test_in_place_merge_is_refused_with_the_supported_path(base_dir, name):
    model = _gated(base_dir, name, "both")
    x = batch()
    model.eval()
    with torch.no_grad():
        gated = model(input_ids=x).logits
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="merge_and_unload"):
        model.merge_adapter()
    for n, p in model.named_parameters():  # nothing was folded into the quantized storage
        assert same_bits(p, before[n]), n
    merged = model.merge_and_unload(multiple_of=1).eval()  # the path the message names
    assert not any(is_quantized_linear(m) for m in merged.modules())
    with torch.no_grad():
        assert rel(gated, merged(input_ids=x).logits) < BOUND[name]


def test_merged_model_saves_and_reloads_dense(base_dir, tmp_path):
    model = _gated(base_dir, "nf4-dq", "units")
    x = batch()
    dense = fold_dense(model).eval()
    assert dense.hf_quantizer is None and not getattr(dense, "is_loaded_in_4bit", False)
    dense.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(is_quantized_linear(m) for m in reloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, dense(input_ids=x).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="still quantized"):
        mark_dequantized(load_quantized(base_dir, "nf4-dq"))


def test_requantize_round_trip(base_dir, tmp_path):
    from peft_gates import pruning

    model = _gated(base_dir, "nf4-dq", "units")
    x = batch()
    dense = mark_dequantized(pruning.prune_and_unload(model, multiple_of=1)).eval()
    with torch.no_grad():
        merged = dense(input_ids=x).logits
    config = BitsAndBytesConfig(**QUANT["nf4-dq"])
    quantized = requantize(copy.deepcopy(dense), config, save_directory=str(tmp_path / "q")).eval()
    layers = [(n, m) for n, m in quantized.named_modules() if is_quantized_linear(m)]
    assert len(layers) == 14
    for name, module in layers:  # exactly bitsandbytes' own nf4 rounding of the merged weight, nothing more
        weight = dense.get_submodule(name).weight.detach().contiguous()
        codes, state = bnb.functional.quantize_4bit(
            weight, quant_type="nf4", compress_statistics=True, blocksize=module.weight.quant_state.blocksize
        )
        assert torch.equal(dequantize_weight(module), bnb.functional.dequantize_4bit(codes, state)), name
    weight_err = [rel(dequantize_weight(m), dense.get_submodule(n).weight) for n, m in layers]
    with torch.no_grad():
        requantized = quantized(input_ids=x).logits
    # nf4's own error on the merged weights, measured: 1e-4 to 8% for most layers, 18% for the 64 x 32
    # o_proj whose columns fractional gates scaled (small values round to 0 in their block); logits 7.8%
    assert max(weight_err) < 0.25
    assert rel(requantized, merged) < 0.15
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu").eval()
    assert any(is_quantized_linear(m) for m in reloaded.modules())
    disable_cpu_repacking(reloaded)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, requantized, rtol=0, atol=0)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="mine' exists and is not empty; pass overwrite=True"):
        requantize(copy.deepcopy(dense), config, save_directory=str(mine))
    assert os.listdir(mine) == ["config.json"] and (mine / "config.json").read_text() == "{}"
    requantize(copy.deepcopy(dense), config, save_directory=str(mine), overwrite=True)
    assert "model.safetensors" in os.listdir(mine) and sorted(os.listdir(tmp_path)) == ["mine", "q"]


# ----------------------------------------------------------------------------------------------- TRL


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def test_sft_trainer_on_a_4bit_base_keeps_gates_fp32_and_merges(base_dir, tmp_path):
    import datasets
    import trl

    from peft_gates import training

    model = load_quantized(base_dir, "nf4-dq")
    rows = [{"text": " ".join(f"w{(7 * i + j) % 80}" for j in range(12))} for i in range(16)]
    trainer = trl.SFTTrainer(
        model=model,
        args=trl.SFTConfig(
            output_dir=str(tmp_path),
            max_steps=3,
            per_device_train_batch_size=4,
            learning_rate=0.05,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            bf16=False,  # TRL defaults to bf16=True, gradient_checkpointing=True: keep the latter
            save_strategy="no",
            disable_tqdm=True,
            max_length=16,
        ),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=_word_tokenizer(),
        peft_config=GateConfig(placement="units", sparsity_weight=5.0, init_mean=0.3),
    )
    assert trainer.args.gradient_checkpointing
    gates = gate_params(trainer.model)
    # trl/trainer/sft_trainer.py, SFTTrainer.__init__ ("When using QLoRA ... converted to bf16")
    assert {p.dtype for p in gates.values()} == {torch.bfloat16}
    training.attach(trainer)  # casts them back before train() builds the optimizer
    assert {p.dtype for p in gates.values()} == {torch.float32}
    start = {n: p.detach().clone() for n, p in gates.items()}
    trainer.train()
    assert {p.dtype for p in gates.values()} == {torch.float32}
    assert all(p.dtype == torch.float32 for group in trainer.optimizer.param_groups for p in group["params"])
    assert all(not torch.equal(start[n], p) for n, p in gates.items())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    peft_model = trainer.model
    x = batch(size=(2, 12))
    peft_model.eval()
    with torch.no_grad():
        gated = peft_model(input_ids=x).logits
    dense = fold_dense(peft_model).eval()
    with torch.no_grad():
        assert rel(gated, dense(input_ids=x).logits) < BOUND["nf4-dq"]


def test_4bit_integration_script_trains_prunes_and_requantizes(tmp_path):
    """integrations/quantized/sft_4bit.py on its tiny random Llama: adapter, dense pruned model and an nf4
    copy that reloads quantized; a second run into the same folder replaces its outputs."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "integrations" / "quantized" / "sft_4bit.py"
    spec = importlib.util.spec_from_file_location("sft_4bit", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--out_dir", str(tmp_path), "--max_steps", "2", "--requantize"]
    assert script.main(argv) == tmp_path
    weights = {name: tmp_path / name / "model.safetensors" for name in ("pruned", "pruned-nf4")}
    written = {name: path.stat().st_mtime_ns for name, path in weights.items()}
    assert script.main(argv) == tmp_path  # rerun: its own subfolders are rewritten, not refused
    assert all(path.stat().st_mtime_ns > written[name] for name, path in weights.items())
    assert {"adapter", "pruned", "pruned-nf4"} <= set(os.listdir(tmp_path))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    # the dense pruned model: saved without the 4-bit config, reloads as plain Linear layers
    assert "quantization_config" not in json.loads((tmp_path / "pruned" / "config.json").read_text())
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert not any(is_quantized_linear(m) for m in dense.modules())
    config = json.loads((tmp_path / "pruned-nf4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned-nf4", device_map="cpu").eval()
    assert any(is_quantized_linear(m) for m in reloaded.modules())
    # the nf4 copy is that dense model rounded once more to 4 bit: same answers up to that rounding
    x = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))  # the script's 125 words
    with torch.no_grad():
        assert rel(reloaded(input_ids=x).logits, dense(input_ids=x).logits) < 0.1


# ------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_in_4bit_trains_merges_and_matches(tmp_path):
    from peft_gates import assets, pruning

    try:
        dense, tokenizer = assets.load_smollm2()  # the GGUF dequantized by transformers, fp32
    except RuntimeError as err:
        pytest.skip(str(err))
    path = tmp_path / "smollm2"
    dense.save_pretrained(path)  # a plain fp32 checkpoint, then loaded in 4 bit like any Hub model
    del dense
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu")
    prepare_quantized_for_gates(model)
    torch.manual_seed(0)
    model = get_peft_model(model, GateConfig(placement="units", sparsity_weight=1.0, init_mean=0.3))
    pairs = [
        ("a gorgeous, witty, seductive movie.", 1),
        ("the plot is nothing but boilerplate clichés.", 0),
    ] * 2
    texts = [
        tokenizer.apply_chat_template(
            assets.sentiment_messages(s) + [{"role": "assistant", "content": assets.ANSWER_WORDS[y]}],
            tokenize=False,
        )
        for s, y in pairs
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)

    def loss_eval() -> float:
        model.eval()
        with torch.no_grad():
            return model(**enc, labels=labels).loss.item()

    start = loss_eval()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(6):
        optimizer.zero_grad()
        model(**enc, labels=labels).loss.backward()
        optimizer.step()
    end = loss_eval()
    assert end < start, (start, end)
    assert {p.dtype for p in gate_params(model).values()} == {torch.float32}
    model.eval()
    with torch.no_grad():
        gated = model(**enc).logits
    pruned = pruning.prune_and_unload(model, multiple_of=1).eval()
    assert not any(is_quantized_linear(m) for m in pruned.modules())
    with torch.no_grad():
        merged = pruned(**enc).logits
    mask = enc["attention_mask"].bool()
    assert rel(gated[mask], merged[mask]) < 1e-4
