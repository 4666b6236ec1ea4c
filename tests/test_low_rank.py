"""The optional low-rank update inside the gates (``GateConfig.lora_rank``): identity at init, exact
folding into the in-place merge and the pruning merge, save/load, its own optimizer group, 4-bit bases."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from test_pruning import ARCHS, assert_close, gated_model, inputs, logits, n_params, set_gates
from tiny import tiny_inputs, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

import gate_setups as g  # noqa: E402
from transformers import Trainer  # noqa: E402

from peft_gates import GateConfig  # noqa: E402
from peft_gates.pruning import plan_pruning, prune_and_unload  # noqa: E402
from peft_gates.quantization import prepare_quantized_for_gates  # noqa: E402
from peft_gates.training import attach, optimizer_groups  # noqa: E402

RANK = 4


def _randomize_updates(peft_model: torch.nn.Module, seed: int = 0) -> None:
    """Give every B a non-zero value, as after training (B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "peft_gates_lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def _update_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "peft_gates_lora_" in n}


def test_config_rejects_bad_rank_and_alpha():
    for value in (-1, 2.0, True):
        with pytest.raises(ValueError, match=f"GateConfig.lora_rank={value!r} .*non-negative integer"):
            GateConfig(lora_rank=value)
    for value in (0.0, -2.0):
        with pytest.raises(ValueError, match=f"GateConfig.lora_alpha={value!r} .*> 0"):
            GateConfig(lora_rank=8, lora_alpha=value)
    assert GateConfig(lora_rank=8, lora_alpha=16).lora_scaling == 2.0
    assert GateConfig().lora_scaling == 0.0


def test_fresh_wrap_equals_base_and_counts_lora_parameters():
    base = tiny_model("llama")
    x = tiny_inputs()
    with torch.no_grad():
        reference = base(x).logits
    model = get_peft_model(base, GateConfig(target_modules="all-linear", lora_rank=RANK))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x).logits, reference, rtol=0, atol=0)
    updates = _update_params(model)
    assert updates and all(p.requires_grad and p.dtype == torch.float32 for p in updates.values())
    # the update has exactly the parameters of a rank-r LoRA on the same modules
    lora = get_peft_model(tiny_model("llama"), LoraConfig(target_modules="all-linear", r=RANK))
    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert sum(p.numel() for p in updates.values()) == n_lora


@pytest.mark.parametrize(("placement", "scale_gates"), [("units", "both"), ("both", "none")])
@pytest.mark.parametrize("model_type", ARCHS)
def test_update_folds_into_the_pruned_model(model_type: str, placement: str, scale_gates: str) -> None:
    """The update sits between the gates, so a closed unit takes its slice of ``B A`` along: the plan is
    the gates' alone and the pruned model's logits equal the gated model's."""
    peft_model, expected = gated_model(model_type, placement, scale_gates=scale_gates, lora_rank=RANK)
    x = inputs()
    without_update = logits(peft_model, x)
    _randomize_updates(peft_model)
    reference = logits(peft_model, x)
    assert (reference - without_update).abs().max() > 1e-3  # the update changes the model
    plan = plan_pruning(peft_model, multiple_of=1)
    assert [(layer.kept_neurons, layer.kept_units) for layer in plan.layers] == expected
    pruned = prune_and_unload(peft_model, multiple_of=1)
    assert_close(logits(pruned, x), reference)
    assert n_params(pruned) == plan.params_total_after < plan.params_total_before
    assert not any("peft_gates" in name for name, _ in pruned.named_parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear and GPT-2's transposed Conv1D
def test_in_place_merge_folds_the_update(family: str) -> None:
    model = get_peft_model(tiny_model(family), GateConfig(lora_rank=RANK, init_mean=0.3, init_std=1.0)).eval()
    _randomize_updates(model)
    x = tiny_inputs()
    with torch.no_grad():
        reference = model(x).logits
        model.merge_adapter()
        merged = model(x).logits
    torch.testing.assert_close(merged, reference, rtol=1e-5, atol=1e-5)


def test_two_adapters_merged_together_fold_like_their_joint_forward() -> None:
    """Active together, gates multiply and updates add; merging both at once folds exactly that."""
    model = get_peft_model(tiny_model("llama"), GateConfig(lora_rank=RANK, init_mean=0.3, init_std=1.0))
    model.add_adapter("other", GateConfig(lora_rank=2, init_mean=0.4, init_std=1.0))
    _randomize_updates(model)
    model.base_model.set_adapter(["default", "other"])
    model.eval()
    x = tiny_inputs()
    with torch.no_grad():
        reference = model(x).logits
        model.base_model.merge_adapter(["default", "other"])
        torch.testing.assert_close(model(x).logits, reference, rtol=1e-5, atol=1e-5)


def test_adapter_with_update_saves_and_reloads(tmp_path) -> None:
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, GateConfig(placement="units", scale_gates="both", lora_rank=RANK))
    _randomize_updates(model)
    x = tiny_inputs()
    with torch.no_grad():
        expected = model.eval()(x).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    ).eval()
    assert reloaded.peft_config["default"].lora_rank == RANK
    assert set(_update_params(reloaded)) == {n for n in _update_params(model)}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, expected, rtol=0, atol=0)


def test_bitsandbytes_4bit_base_with_update_prunes_exactly(tmp_path) -> None:
    """The update runs beside the 4-bit layer and folds into the dequantized weight at the merge."""
    tiny_model("llama").save_pretrained(tmp_path)
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization, device_map="cpu", dtype=torch.float32
    )
    config = GateConfig(placement="units", scale_gates="both", lora_rank=RANK)
    peft_model = get_peft_model(prepare_quantized_for_gates(base), config)
    expected = set_gates(peft_model, "units")
    _randomize_updates(peft_model)
    x = inputs()
    reference = logits(peft_model.eval(), x)
    plan = plan_pruning(peft_model, multiple_of=1)
    pruned = prune_and_unload(peft_model, multiple_of=1)
    assert [(layer.kept_neurons, layer.kept_units) for layer in plan.layers] == expected
    assert n_params(pruned) == plan.params_total_after
    assert_close(logits(pruned, x), reference)


# --------------------------------------------------------------------------------------------- training


def test_optimizer_groups_give_the_update_its_own_lr() -> None:
    model = get_peft_model(
        tiny_model("bert"),
        GateConfig(task_type="SEQ_CLS", modules_to_save=["classifier"], lora_rank=RANK),
    )
    groups = optimizer_groups(model, lr=1e-2, lora_lr=2e-4, weight_decay=0.1, other_lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {g["lr"]: ({names[id(p)] for p in g["params"]}, g["weight_decay"]) for g in groups}
    gates, gate_decay = by_lr[1e-2]
    updates, _ = by_lr[2e-4]
    other, _ = by_lr[1e-3]
    assert gate_decay == 0.0  # decay would pull every gate towards half-open
    assert all("peft_gates_" in n and "lora" not in n for n in gates)
    assert updates == set(_update_params(model))
    assert other and all("classifier" in n for n in other)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="lora_lr=None"):
        optimizer_groups(model, lr=1e-2)


def _trainer(model: torch.nn.Module, tmp_path: Path, **overrides) -> Trainer:
    args = g.training_args(str(tmp_path), **overrides)
    return Trainer(model=model, args=args, train_dataset=g.RowsDataset(g.token_rows()))


def test_attach_builds_the_grouped_optimizer_and_both_parts_train(tmp_path) -> None:
    model = g.gated_model(lora_rank=RANK)
    trainer = _trainer(model, tmp_path, learning_rate=5e-2, optim="adamw_torch")
    with pytest.raises(ValueError, match="lora_rank=4.*lora_lr="):
        attach(trainer)
    attach(trainer, lora_lr=1e-3)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert sorted(group["lr"] for group in optimizer.param_groups) == [1e-3, 5e-2]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(model.named_parameters())
    moved = {n for n, p in before.items() if not torch.equal(p, after[n].detach())}
    assert any("peft_gates_lora_B" in n for n in moved) and any("peft_gates_col" in n for n in moved)
    # Adam moves a parameter by at most about its lr per step: B by lora_lr, not by the gates' lr
    steps = trainer.state.global_step
    change = max((after[n].detach() - p).abs().max().item() for n, p in before.items() if "lora_B" in n)
    assert 0 < change <= 1e-3 * steps * 1.01
    gate_change = max(
        (after[n].detach() - p).abs().max().item() for n, p in before.items() if "gates_col" in n
    )
    assert gate_change > 1e-3 * steps * 1.01


def test_attach_leaves_a_given_optimizer_alone_and_says_so(tmp_path) -> None:
    model = g.gated_model(lora_rank=RANK)
    optimizer = torch.optim.AdamW(optimizer_groups(model, 1e-2, 1e-4))
    trainer = Trainer(
        model=model,
        args=g.training_args(str(tmp_path)),
        train_dataset=g.RowsDataset(g.token_rows()),
        optimizers=(optimizer, None),
    )
    attach(trainer)  # the update's lr is in the given optimizer's groups
    assert trainer.create_optimizer() is optimizer
    with pytest.warns(UserWarning, match="lora_lr=0.001.*not used"):
        attach(trainer, lora_lr=1e-3)


def test_attach_refuses_lora_lr_without_an_update(tmp_path) -> None:
    trainer = _trainer(g.gated_model(), tmp_path)
    with pytest.raises(ValueError, match="lora_rank=0"):
        attach(trainer, lora_lr=1e-3)


def test_attach_refuses_an_optim_that_regroups_parameters(tmp_path) -> None:
    """LOMO / GaLore-style optims hand the optimizer the model (or their own groups), not our groups;
    their packages are not installed here, so the trainer's optim lookup stands in for one."""
    trainer = _trainer(g.gated_model(lora_rank=RANK), tmp_path, optim="lomo")
    trainer.get_optimizer_cls_and_kwargs = lambda args, model=None: (torch.optim.SGD, {"model": model})
    with pytest.raises(ValueError, match="optim='lomo'.*own parameter groups"):
        attach(trainer, lora_lr=1e-3)
