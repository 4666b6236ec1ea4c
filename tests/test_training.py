"""The sparsity objective in training pipelines (single process): Trainer, SFTTrainer, accelerate loop.

Every equivalence test trains the same tiny gated Llama on the same global batches with plain SGD
(updates proportional to gradients, so a wrongly scaled sparsity gradient shows) and gate noise off
(noise_std=0): the noise is one draw per gate per forward, so splitting a batch into two micro-batches
draws twice and legitimately changes the trajectory. Negative controls show that the comparisons are
sensitive to exactly the errors they guard against.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

import gate_setups as g  # noqa: E402

import peft_gates  # noqa: E402
from peft_gates import gates  # noqa: E402
from peft_gates.layer import GateLayer  # noqa: E402
from peft_gates.training import (  # noqa: E402
    METRIC_KEYS,
    GateTrainerCallback,
    attach,
    check_trainer,
    current_loss_scale,
    gate_model_of,
    optimizer_groups,
    set_sparsity_step,
)

TOL = 2e-5  # float32 reduction-order noise between setups over 8 SGD steps is ~1e-6


pytestmark = pytest.mark.usefixtures("one_thread")


_CACHE: dict[tuple, dict] = {}


def run(tmp_path_factory, attach_callback: bool = True, gates_kw: dict | None = None, **args_kw) -> dict:
    """Train with transformers.Trainer + attach (memoized per configuration within the session)."""
    from transformers import Trainer

    key = (attach_callback, tuple(sorted((gates_kw or {}).items())), tuple(sorted(map(str, args_kw.items()))))
    if key not in _CACHE:
        out = str(tmp_path_factory.mktemp("run"))
        resume = args_kw.pop("resume", None)
        args = g.training_args(out, **args_kw)
        model = g.gated_model(**(gates_kw or {}))
        trainer = Trainer(model=model, args=args, train_dataset=g.RowsDataset(g.token_rows()))
        if attach_callback:
            attach(trainer)
        trainer.train(resume_from_checkpoint=resume)
        _CACHE[key] = {"curves": g.curves(trainer), "gates": g.gate_vectors(trainer.model), "out": out}
    return _CACHE[key]


def flat(gate_vectors: dict[str, list[float]]) -> np.ndarray:
    return np.concatenate([np.asarray(gate_vectors[k]) for k in sorted(gate_vectors)])


def max_diff(a: dict, b: dict) -> dict[str, float]:
    """Largest absolute differences between two runs: final gates and every per-step curve."""
    out = {"gates": float(np.abs(flat(a["gates"]) - flat(b["gates"])).max())}
    for key in ("loss", "sparsity_loss", "sparsity_realized"):
        if key in a["curves"] and key in b["curves"]:
            out[key] = float(np.abs(np.subtract(a["curves"][key], b["curves"][key])).max())
    return out


def assert_same(a: dict, b: dict, tol: float = TOL) -> dict[str, float]:
    diffs = max_diff(a, b)
    assert all(v <= tol for v in diffs.values()), diffs
    assert len(a["curves"]["loss"]) == len(b["curves"]["loss"])
    return diffs


def expected_sparsity_grad(peft_model, lam: float) -> dict[str, torch.Tensor]:
    """lambda * d(mean over gated layers of the mean over sides of |mean p - keep|)/d theta, by autograd."""
    tuner = gate_model_of(peft_model)
    cfg = tuner.peft_config["default"]
    names = {id(p): n for n, p in peft_model.named_parameters()}
    params, terms = [], []
    for layer in tuner.gated_layers("default").values():
        vectors = layer.gate_vectors("default")
        params += list(vectors.values())
        terms.append(
            sum(gates.sparsity_term(t, cfg.keep, cfg.sigma) for t in vectors.values()) / len(vectors)
        )
    grads = torch.autograd.grad(lam * torch.stack(terms).mean(), params)
    return {names[id(p)]: gr for p, gr in zip(params, grads, strict=True)}


# --------------------------------------------------------------------------------------------- exact gradient


@pytest.mark.parametrize("ga,loss_scale", [(1, 1.0), (2, 1.0), (4, 1024.0)])
def test_injected_gradient_is_exactly_lambda_times_autograd_of_the_term(ga, loss_scale):
    model = g.gated_model().train()
    lam = model.peft_config["default"].sparsity_weight
    injected = g.injected_sparsity_gradient(model, ga, loss_scale)
    expected = expected_sparsity_grad(model, lam)
    assert set(injected) == set(expected)
    for name, value in injected.items():
        torch.testing.assert_close(value, expected[name] * loss_scale / ga, rtol=1e-5, atol=1e-9)
    assert max(v.abs().max() for v in expected.values()) > 1e-4  # the term has a real gradient here


def test_trainer_step_injects_lambda_schedule_over_ga(tmp_path):
    """Through Trainer + attach: GA=2 micro-batches, warm-up lambda at step 0, grads before the optimizer."""
    from transformers import Trainer, TrainerCallback

    captured: dict[str, dict[str, torch.Tensor]] = {}

    class Grab(TrainerCallback):
        def __init__(self, key):
            self.key = key

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            captured[self.key] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    schedule = dict(sparsity_warmup_steps=4)  # lambda at step 0 = 5 * 1/4
    for key, weight in (("on", 5.0), ("off", 0.0)):
        model = g.gated_model(sparsity_weight=weight, **schedule)
        args = g.training_args(
            str(tmp_path / key),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=1,
            max_grad_norm=0.0,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=g.RowsDataset(g.token_rows()), callbacks=[Grab(key)]
        )
        attach(trainer)
        trainer.train()
    reference = g.gated_model(**schedule)  # same seeds: the parameters both runs started from
    expected = expected_sparsity_grad(reference, 5.0 * 1 / 4)
    for name, value in expected.items():
        torch.testing.assert_close(captured["on"][name] - captured["off"][name], value, rtol=1e-4, atol=1e-8)


# --------------------------------------------------------------------------------------------- term applied


def test_sparsity_term_is_applied_and_logged(tmp_path_factory):
    on = run(tmp_path_factory)
    off = run(tmp_path_factory, gates_kw=dict(sparsity_weight=0.0))
    c_on, c_off = on["curves"], off["curves"]
    assert set(METRIC_KEYS) <= set(c_on)
    # The regularizer falls clearly with lambda > 0 and barely moves without it.
    assert c_on["sparsity_loss"][-1] < c_on["sparsity_loss"][0] - 0.1
    assert abs(c_off["sparsity_loss"][-1] - c_off["sparsity_loss"][0]) < 0.02
    assert c_on["sparsity_realized"][-1] > 0.05 and c_off["sparsity_realized"][-1] < 0.01
    assert c_on["params_removable"][-1] > 0
    assert all(v == 5.0 for v in c_on["sparsity_lambda"]) and all(v == 0.0 for v in c_off["sparsity_lambda"])
    # Gates closed on average: lambda pushed theta down everywhere.
    assert flat(on["gates"]).mean() < flat(off["gates"]).mean() - 0.1


# --------------------------------------------------------------------------------------------- recovery phase


def test_recovery_phase_trains_exactly_the_model_the_merge_makes():
    """From recovery_start_step: no noise, lambda 0, closed gates exactly 0 with no gradient; training
    forward == eval forward == the pruned model's forward."""
    import copy

    model = g.gated_model(noise_std=0.3, init_std=1.0, recovery_start_step=2).train()
    batch = {k: v[None] for k, v in g.RowsDataset(g.token_rows())[0].items()}
    tuner = gate_model_of(model)
    coef = tuner.sparsity_coefficients["default"]
    with pytest.raises(ValueError, match="step=None is invalid: pass the optimizer step"):
        set_sparsity_step(model, None)
    set_sparsity_step(model, 1)
    assert coef.weight == 5.0 and not coef.recovering
    noisy = model(**batch).logits
    assert not torch.equal(noisy, model(**batch).logits)  # before it: a fresh noise draw per forward

    assert set_sparsity_step(model, 2) == 0.0 and coef.recovering
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    with torch.no_grad():
        evaluated = model.eval()(**batch).logits
        pruned = copy.deepcopy(model).merge_and_unload()(batch["input_ids"]).logits
    torch.testing.assert_close(out.logits, evaluated, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, pruned, rtol=1e-4, atol=1e-5)
    closed = open_ = 0
    for layer in tuner.gated_layers().values():
        for theta in layer.gate_vectors("default").values():
            shut = gates.eval_value(theta.detach()) == 0
            assert torch.all(theta.grad[shut] == 0)  # no task gradient and no sparsity gradient
            closed, open_ = closed + int(shut.sum()), open_ + int((theta.grad[~shut] != 0).sum())
    assert closed > 0 and open_ > 0  # the check covers both kinds of gates


def test_recovery_phase_keeps_the_closed_set_through_trainer(tmp_path):
    """Through Trainer + attach: the gates closed when the phase begins end the run bit-identical (plain
    SGD carries no momentum), the sparsity term stops, and the gates still open keep training."""
    from transformers import Trainer, TrainerCallback

    snapshot: dict[str, torch.Tensor] = {}

    class Snapshot(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 4:
                params = model.named_parameters()
                snapshot.update({n: p.detach().clone() for n, p in params if "peft_gates_" in n})

    model = g.gated_model(noise_std=0.1, recovery_start_step=4)
    trainer = Trainer(
        model=model,
        args=g.training_args(str(tmp_path), max_steps=8),
        train_dataset=g.RowsDataset(g.token_rows()),
        callbacks=[Snapshot()],
    )
    attach(trainer)
    trainer.train()
    curves = g.curves(trainer)
    assert curves["sparsity_lambda"] == [5.0] * 4 + [0.0] * 4
    closed = moved = 0
    for name, before in snapshot.items():
        after = dict(model.named_parameters())[name].detach()
        shut = gates.eval_value(before) == 0
        assert torch.equal(after[shut], before[shut]), name
        closed, moved = closed + int(shut.sum()), moved + int((after[~shut] != before[~shut]).sum())
    assert closed > 0 and moved > 0
    # none reopened (an open gate may still close under the task gradient alone)
    assert curves["sparsity_realized"][-1] >= curves["sparsity_realized"][3] > 0


def test_metrics_reach_reporters_before_they_log(tmp_path):
    from transformers import Trainer, TrainerCallback

    seen: list[dict] = []

    class Reporter(TrainerCallback):  # stands in for TensorBoard / W&B: they log the `logs` dict on_log
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer = Trainer(
        model=g.gated_model(),
        args=g.training_args(str(tmp_path), max_steps=2),
        train_dataset=g.RowsDataset(g.token_rows()),
        callbacks=[Reporter()],
    )
    callback = attach(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    assert attach(trainer) is not callback  # idempotent: replaced, not duplicated
    assert sum(isinstance(c, GateTrainerCallback) for c in trainer.callback_handler.callbacks) == 1
    trainer.train()
    train_logs = [s for s in seen if "loss" in s]
    assert len(train_logs) == 2 and all(set(METRIC_KEYS) <= set(s) for s in train_logs)
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["sparsity_loss"] for h in history] == [s["sparsity_loss"] for s in train_logs]


# --------------------------------------------------------------------------------------------- equivalences


def test_gradient_accumulation_matches_full_batch(tmp_path_factory):
    ref = run(tmp_path_factory)
    ga2 = run(tmp_path_factory, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    ga4 = run(tmp_path_factory, per_device_train_batch_size=1, gradient_accumulation_steps=4)
    assert_same(ref, ga2)
    assert_same(ref, ga4)
    # Negative controls: the injected gradient not divided by GA (2x too strong) must show.
    unscaled = run(
        tmp_path_factory, attach_callback=False, per_device_train_batch_size=2, gradient_accumulation_steps=2
    )
    assert max_diff(ref, unscaled)["gates"] > 0.1
    from transformers import Trainer

    out = str(tmp_path_factory.mktemp("ga_unscaled"))
    trainer = Trainer(
        model=g.gated_model(),
        args=g.training_args(out, per_device_train_batch_size=2, gradient_accumulation_steps=2),
        train_dataset=g.RowsDataset(g.token_rows()),
    )
    attach(trainer)._gradient_accumulation_steps = lambda args: 1  # "forgot" the GA division
    trainer.train()
    control = max_diff(ref, {"curves": g.curves(trainer), "gates": g.gate_vectors(trainer.model)})
    assert control["gates"] > 0.1 and control["sparsity_loss"] > 1e-2, control


def test_short_last_accumulation_window(tmp_path):
    """30 rows, batch 2 x GA 2: the epoch's last step accumulates ONE micro-batch. The Trainer scales
    that step's loss for one micro-batch; the sparsity gradient must follow, not args' GA.
    """
    from transformers import Trainer

    def train(**kw) -> dict:
        trainer = Trainer(
            model=g.gated_model(),
            args=g.training_args(str(tmp_path / str(len(kw))), train_sampling_strategy="sequential", **kw),
            train_dataset=g.RowsDataset(g.token_rows(30)),
        )
        attach(trainer)
        trainer.train()
        return {"curves": g.curves(trainer), "gates": g.gate_vectors(trainer.model)}

    ref = train(per_device_train_batch_size=4)  # 8 steps: 7 x 4 rows + 1 x 2 rows
    ga2 = train(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert len(ga2["curves"]["loss"]) == 8
    assert_same(ref, ga2)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_matches(tmp_path_factory, reentrant):
    ref = run(tmp_path_factory)
    gc = run(
        tmp_path_factory,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    assert_same(ref, gc)


@pytest.mark.parametrize("reentrant", [False, True])
def test_global_scope_matches_under_checkpointing_and_accumulation(tmp_path_factory, reentrant):
    """The global budget reads every layer's open mass in each backward: recomputed forwards (gradient
    checkpointing) and micro-batches (accumulation) must leave the trajectory unchanged."""
    scope = {"placement": "units", "sparsity_scope": "global"}
    ref = run(tmp_path_factory, gates_kw=scope)
    gc = run(
        tmp_path_factory,
        gates_kw=scope,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    assert_same(ref, gc)
    per_layer = run(tmp_path_factory, gates_kw={"placement": "units"})  # control: the scope matters here
    assert max_diff(ref, per_layer)["gates"] > 1e-2


def test_loss_scaling_is_undone_like_the_loss(tmp_path_factory, tmp_path):
    """fp16-style loss scaling (a GradScaler; CPU autocast has none, so it is installed by hand)."""
    from transformers import Trainer

    ref = run(tmp_path_factory, max_grad_norm=0.0)
    trainer = Trainer(
        model=g.gated_model(),
        args=g.training_args(str(tmp_path), max_grad_norm=0.0),
        train_dataset=g.RowsDataset(g.token_rows()),
    )
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    assert current_loss_scale(trainer.accelerator) == 2.0**12
    attach(trainer)
    trainer.train()
    scaled = {"curves": g.curves(trainer), "gates": g.gate_vectors(trainer.model)}
    assert_same(ref, scaled)


def test_bf16_autocast_stays_close(tmp_path_factory):
    ref = run(tmp_path_factory)
    bf16 = run(tmp_path_factory, bf16=True)
    diffs = max_diff(ref, bf16)
    # measured: loss 1.3e-4, sparsity loss 9.6e-6, gates 2.5e-3 (bf16 matmuls); bounds ~10x that. A loss
    # difference of zero would mean autocast never ran.
    assert 1e-6 < diffs["loss"] < 2e-3 and diffs["sparsity_loss"] < 1e-4 and diffs["gates"] < 2.5e-2, diffs


def test_resume_from_checkpoint_gives_the_same_gates(tmp_path_factory):
    """Gate noise ON and a delayed, warmed-up lambda: RNG state and lambda schedule must both resume."""
    gates_kw = dict(noise_std=0.1, sparsity_start_step=2, sparsity_warmup_steps=4)
    common = dict(max_steps=12, save_strategy="steps", save_steps=6)
    full = run(tmp_path_factory, gates_kw=gates_kw, **common)
    checkpoint = str(Path(full["out"]) / "checkpoint-6")
    resumed = run(tmp_path_factory, gates_kw=gates_kw, resume=checkpoint, **common)
    assert np.abs(flat(full["gates"]) - flat(resumed["gates"])).max() <= TOL
    # log_history of the resumed run = the checkpoint's 6 entries + 6 new ones.
    np.testing.assert_allclose(full["curves"]["sparsity_loss"], resumed["curves"]["sparsity_loss"], atol=TOL)
    np.testing.assert_allclose(full["curves"]["loss"], resumed["curves"]["loss"], atol=TOL)
    assert full["curves"]["sparsity_lambda"][:4] == [0.0, 0.0, 1.25, 2.5]
    quiet = run(tmp_path_factory, gates_kw={**gates_kw, "noise_std": 0.0}, **common)
    assert np.abs(flat(full["gates"]) - flat(quiet["gates"])).max() > 100 * TOL  # the noise does act


# ------------------------------------------------------------------------------------------ accelerate loop


def _load_integration(relative: str):
    return g.load_integration(relative)


def test_plain_accelerate_loop_matches_trainer(tmp_path_factory):
    from accelerate import Accelerator

    loop = _load_integration("accelerate/train_loop.py")
    ref = run(tmp_path_factory, max_grad_norm=0.0, train_sampling_strategy="sequential")
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    model = g.gated_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=50.0)
    loader = torch.utils.data.DataLoader(g.RowsDataset(g.token_rows()), batch_size=2, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    history = loop.train(model, loader, optimizer, accelerator, max_steps=8)
    result = {
        "curves": {k: [h[k] for h in history] for k in ("loss", "sparsity_loss", "sparsity_realized")},
        "gates": g.gate_vectors(model),
    }
    assert_same(ref, result)


def test_accelerate_loop_starts_a_step_after_every_sync(monkeypatch):
    """3 micro-batches per pass at GA 2: accelerate also steps at the end of each pass, so steps hold
    2, 1, 2, 1 micro-batches, and each must get its own set_sparsity_step before its first one."""
    from accelerate import Accelerator

    loop = _load_integration("accelerate/train_loop.py")
    calls = []
    monkeypatch.setattr(loop, "set_sparsity_step", lambda model, step, acc: calls.append(step))
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    model = g.gated_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    loader = torch.utils.data.DataLoader(g.RowsDataset(g.token_rows()[:3]), batch_size=1, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    history = loop.train(model, loader, optimizer, accelerator, max_steps=4)
    assert calls == [0, 1, 2, 3] and [h["step"] for h in history] == [1, 2, 3, 4]
    empty = accelerator.prepare(torch.utils.data.DataLoader([], batch_size=1))
    with pytest.raises(ValueError, match="yielded no batch"):
        loop.train(model, empty, optimizer, accelerator, max_steps=1)


# --------------------------------------------------------------------------------------------- SFTTrainer


def _sft_trainer(tmp_path, model=None, peft_config=None, **config_kw):
    import datasets
    from trl import SFTConfig, SFTTrainer

    kwargs = dict(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=50.0,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(config_kw)
    return SFTTrainer(
        model=model if model is not None else g.tiny_llama(),
        args=SFTConfig(**kwargs),
        train_dataset=datasets.Dataset.from_list(g.text_rows()),
        processing_class=g.tiny_tokenizer(),
        peft_config=peft_config if peft_config is not None else g.gate_config(),
    )


def test_sft_trainer_applies_the_term(tmp_path):
    curves = {}
    for weight in (5.0, 0.0):
        trainer = _sft_trainer(tmp_path / str(weight), peft_config=g.gate_config(sparsity_weight=weight))
        assert trainer.args.gradient_checkpointing  # TRL's default, non-reentrant under transformers 5
        attach(trainer)
        trainer.train()
        curves[weight] = g.curves(trainer)
    on, off = curves[5.0], curves[0.0]
    assert set(METRIC_KEYS) <= set(on)
    assert on["sparsity_loss"][-1] < on["sparsity_loss"][0] - 0.05
    assert abs(off["sparsity_loss"][-1] - off["sparsity_loss"][0]) < 0.02


@pytest.mark.parametrize(
    "mode", [{"loss_type": "dft"}, {"label_smoothing_factor": 0.1}, {"packing": True, "max_length": 26}]
)
def test_sft_trainer_loss_modes_run_the_gates(tmp_path, mode):
    """TRL loss modes other than plain NLL still run every gate layer with gradients (probe stays quiet)."""
    trainer = _sft_trainer(tmp_path, max_steps=3, gradient_checkpointing=False, **mode)
    attach(trainer)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*did not run a training forward.*")
        trainer.train()
    curve = g.curves(trainer)["sparsity_loss"]
    assert curve[-1] < curve[0] - 0.01


def test_sft_trainer_quantized_base_gates_back_to_fp32(tmp_path):
    """SFTTrainer casts trainable params of a 4-bit model to bf16; attach() restores fp32 before train()."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    g.tiny_llama().save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=quant, device_map="cpu"
    )
    model.train()  # bnb trap: a first eval-mode no-grad forward repacks 4-bit weights without autograd
    trainer = _sft_trainer(tmp_path / "run", model=model, max_steps=3, gradient_checkpointing=False)
    gate_params = [p for n, p in trainer.model.named_parameters() if "peft_gates_" in n]
    assert {p.dtype for p in gate_params} == {torch.bfloat16}
    attach(trainer)
    assert {p.dtype for p in gate_params} == {torch.float32}
    trainer.train()
    assert {p.dtype for p in gate_params} == {torch.float32}
    assert trainer.optimizer.param_groups[0]["params"][0].dtype == torch.float32
    curve = g.curves(trainer)["sparsity_loss"]
    assert curve[-1] < curve[0]


# --------------------------------------------------------------------------------------------- TRL script


def test_sft_script_trains_saves_and_prunes(tmp_path):
    """integrations/trl/sft_gates.py end to end on CPU: local model dir + local jsonl, no downloads."""
    from transformers import AutoModelForCausalLM

    script = _load_integration("trl/sft_gates.py")
    base_dir, data_dir = g.write_sft_inputs(tmp_path)
    out_dir = tmp_path / "out"
    result = script.main(g.sft_argv(base_dir, data_dir, out_dir))
    final = result["final_log"]
    assert (
        final["sparsity_lambda"] == 5.0 and final["sparsity_realized"] > 0 and final["params_removable"] > 0
    )
    assert (out_dir / "adapter_config.json").exists()
    pruned = AutoModelForCausalLM.from_pretrained(result["pruned_dir"])
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    n_base, n_pruned = (sum(p.numel() for p in m.parameters()) for m in (base, pruned))
    assert n_base - n_pruned == final["params_removable"]


def test_gate_arguments_mirror_gate_config():
    from dataclasses import fields

    from peft import PeftConfig

    script = _load_integration("trl/sft_gates.py")
    args = script.GateArguments()
    config = peft_gates.GateConfig()
    mirrored = set()
    for f in fields(args):
        if f.name in args.NOT_CONFIG:
            continue
        name = args.RENAMED.get(f.name, f.name)
        mirrored.add(name)
        expected = getattr(config, name)
        value = getattr(args, f.name)
        assert (str(expected) if name == "column_group_size" else expected) == value, name
    own = {f.name for f in fields(peft_gates.GateConfig)} - {f.name for f in fields(PeftConfig)}
    assert own <= mirrored, f"GateConfig fields without a command-line option: {sorted(own - mirrored)}"
    built = script.GateArguments(
        column_group_size='{"o_proj": 8}', gate_target_modules=["all-linear"]
    ).to_config()
    assert built.column_group_size == {"o_proj": 8} and built.target_modules == "all-linear"
    with pytest.raises(ValueError, match="--gate_lora_rank 2 needs --gate_lora_lr"):  # before any loading
        script.main(g.sft_argv(Path("no-such-model"), Path("no-such-data"), Path("unused"), gate_lora_rank=2))
    with pytest.raises(ValueError, match="--gate_scale_lr 0.0 needs scale gates"):  # before any loading
        script.main(
            g.sft_argv(Path("no-such-model"), Path("no-such-data"), Path("unused"), gate_scale_lr=0.0)
        )
    for bad in ("abc", "{o_proj: 64}"):
        with pytest.raises(ValueError, match=f"--column_group_size '{bad}' is invalid.*integer.*JSON object"):
            script.GateArguments(column_group_size=bad).to_config()


def test_sft_script_names_a_missing_split_and_an_unknown_file_type(tmp_path):
    from types import SimpleNamespace

    script = _load_integration("trl/sft_gates.py")
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a b c"}\n')
    names = SimpleNamespace(dataset_name=str(data), dataset_config=None)
    split = dict(dataset_train_split="train", dataset_test_split="test")
    train, evaluation = script.load_train_eval(
        SimpleNamespace(**vars(names), **split), SimpleNamespace(eval_strategy="no")
    )
    assert len(train) == 1 and evaluation is None
    with pytest.raises(ValueError, match=r"has no split 'test' \(it has \['train'\]\).*--eval_strategy no"):
        script.load_train_eval(
            SimpleNamespace(**vars(names), **split), SimpleNamespace(eval_strategy="steps")
        )
    gz = tmp_path / "train.jsonl.gz"
    gz.write_bytes(b"")
    with pytest.raises(ValueError, match=r"unknown data file type '.gz'; use one of \["):
        script.load_train_eval(
            SimpleNamespace(dataset_name=str(gz), dataset_config=None, **split),
            SimpleNamespace(eval_strategy="no"),
        )


# --------------------------------------------------------------------------------------------- checks


def test_refuses_setups_where_the_term_would_silently_not_apply(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    def trainer_for(model):
        return Trainer(
            model=model, args=g.training_args(str(tmp_path)), train_dataset=g.RowsDataset(g.token_rows())
        )

    with pytest.raises(TypeError, match="no peft_gates adapter"):
        attach(trainer_for(get_peft_model(g.tiny_llama(), LoraConfig(target_modules="all-linear"))))
    gateless = g.gated_model()  # PEFT refuses unmatched target_modules; remove the gate vectors instead
    for layer in gate_model_of(gateless).gated_layers("default").values():
        for store in (layer.peft_gates_row, layer.peft_gates_col):
            if "default" in store:
                del store["default"]
    with pytest.raises(ValueError, match="gates no layer"):
        attach(trainer_for(gateless))
    frozen = g.gated_model()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no gate of adapter 'default' is trainable"):
        attach(trainer_for(frozen))
    merged = g.gated_model()
    merged.base_model.model.model.layers[0].mlp.down_proj.merge()
    with pytest.raises(ValueError, match="merged"):
        attach(trainer_for(merged))
    with pytest.raises(ValueError, match=r"adapter_name='typo' is not an adapter.*\['default'\]"):
        attach(trainer_for(g.gated_model()), adapter_name="typo")
    with pytest.raises(ValueError, match="removable_multiple_of=0.*integer >= 1.*None"):
        attach(trainer_for(g.gated_model()), removable_multiple_of=0)


def _gate_lm_head(trainer) -> None:
    """Put a gate layer on lm_head after SFTTrainer construction (TRL refuses one passed in)."""
    from peft_gates.layer import Linear

    tuner = gate_model_of(trainer.model)
    inner = tuner.model
    layer = Linear(inner.lm_head, "default", tuner.peft_config["default"], ("rows",), ("rows",))
    layer.sparsity = tuner.sparsity_coefficients
    inner.lm_head = layer


def test_sft_gated_lm_head_is_refused_and_probed(tmp_path):
    trainer = _sft_trainer(tmp_path, max_steps=1, gradient_checkpointing=False)
    _gate_lm_head(trainer)
    with pytest.raises(ValueError, match="fused LM head"):
        attach(trainer)
    # Without the static check, the first-step probe reports the bypassed layer.
    trainer.callback_handler.callbacks.insert(0, GateTrainerCallback(trainer))
    with pytest.warns(UserWarning, match=r"1 of 15 gated layers \(e.g. lm_head\) did not run"):
        trainer.train()


def test_probe_raises_when_no_gate_runs(tmp_path):
    """If no gate layer ran a differentiable forward in the first step, nothing trains the gates: error.

    (With gates as the only trainable parameters torch itself already fails in backward; this guards
    runs that also train other parameters, e.g. modules_to_save.)
    """
    from transformers import Trainer, TrainerState

    trainer = Trainer(
        model=g.gated_model(),
        args=g.training_args(str(tmp_path)),
        train_dataset=g.RowsDataset(g.token_rows()),
    )
    callback = GateTrainerCallback(trainer)
    callback._start_probe(TrainerState())
    with trainer.model.disable_adapter():  # gate layers run, but as their base layer only: not counted
        trainer.model.train()
        trainer.model(**{k: v[None] for k, v in g.RowsDataset(g.token_rows())[0].items()})
    with pytest.raises(RuntimeError, match="no gate is trained"):
        callback._finish_probe()


def test_ddp_check_runs_without_ddp(tmp_path):
    """check_trainer is silent for a clean single-process set-up (the DDP cases run in test_distributed)."""
    from transformers import Trainer

    trainer = Trainer(
        model=g.gated_model(),
        args=g.training_args(str(tmp_path), gradient_checkpointing=True),
        train_dataset=g.RowsDataset(g.token_rows()),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_trainer(trainer) == []


def _units_with_scale_gates():
    return g.gated_model(placement="units", scale_gates="both", target_modules=None)


def _gate_sides(model) -> tuple[set[str], set[str]]:
    """Names of the unit gates (under the sparsity term) and of the scale gates, read off the layers."""
    names = {id(p): n for n, p in model.named_parameters()}
    units, scales = set(), set()
    for module in model.modules():
        if isinstance(module, GateLayer):
            for side, param in module.gate_vectors("default").items():
                (units if side in module.regularized["default"] else scales).add(names[id(param)])
    return units, scales


def test_optimizer_groups_give_scale_gates_their_own_lr():
    model = _units_with_scale_gates()
    units, scales = _gate_sides(model)
    assert units and scales
    names = {id(p): n for n, p in model.named_parameters()}
    groups = optimizer_groups(model, lr=2e-2, scale_lr=1e-4)
    by_lr = {group["lr"]: {names[id(p)] for p in group["params"]} for group in groups}
    assert by_lr == {2e-2: units, 1e-4: scales}
    assert all(group["weight_decay"] == 0.0 for group in groups)
    # by default the scale gates train with the unit gates, in one group
    assert [len(group["params"]) for group in optimizer_groups(model, lr=2e-2)] == [len(units | scales)]
    with pytest.raises(ValueError, match="scale_lr=-1.*>= 0"):
        optimizer_groups(model, lr=2e-2, scale_lr=-1.0)
    with pytest.raises(ValueError, match=r"optimizer_groups\(lr=-0.1\) is invalid.*finite number >= 0"):
        optimizer_groups(model, lr=-0.1)
    with pytest.raises(ValueError, match=r"optimizer_groups\(other_lr=nan\)"):
        optimizer_groups(model, lr=2e-2, other_lr=float("nan"))
    with pytest.raises(ValueError, match="scale_lr=0.001.*no scale gates.*scale_gates="):
        optimizer_groups(g.gated_model(), lr=2e-2, scale_lr=1e-3)


def test_attach_scale_lr_zero_trains_the_unit_gates_only(tmp_path):
    from transformers import Trainer

    model = _units_with_scale_gates()
    units, scales = _gate_sides(model)
    args = g.training_args(str(tmp_path), learning_rate=5e-2, optim="adamw_torch")
    trainer = Trainer(model=model, args=args, train_dataset=g.RowsDataset(g.token_rows()))
    attach(trainer, scale_lr=0.0)
    assert sorted(group["lr"] for group in trainer.create_optimizer().param_groups) == [0.0, 5e-2]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(model.named_parameters())
    moved = {n for n, p in before.items() if not torch.equal(p, after[n].detach())}
    assert moved & units and not moved & scales
    # a trainer that already has an optimizer keeps it, and attach says the lr is not used
    given = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = Trainer(
        model=model, args=args, train_dataset=g.RowsDataset(g.token_rows()), optimizers=(given, None)
    )
    with pytest.warns(UserWarning, match="scale_lr=0.0.*not used"):
        attach(trainer, scale_lr=0.0)
    assert trainer.create_optimizer() is given
    trainer = Trainer(model=g.gated_model(), args=args, train_dataset=g.RowsDataset(g.token_rows()))
    with pytest.raises(ValueError, match="no scale gates"):
        attach(trainer, scale_lr=0.0)


def test_public_api():
    """``__all__`` names real objects, the import registers the tuner, and the version is the package's."""
    import re

    from peft import mapping

    import peft_gates.training as training

    missing = [name for name in peft_gates.__all__ if not hasattr(peft_gates, name)]
    assert missing == []
    assert peft_gates.attach is training.attach and peft_gates.set_sparsity_step is training.set_sparsity_step
    key = peft_gates.GatePeftType.PEFT_GATES
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] is peft_gates.GateConfig
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] is peft_gates.GateModel
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] == peft_gates.GateModel.prefix
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert peft_gates.__version__ == re.search(r'^version = "(.+)"$', pyproject, re.M).group(1)
    assert math.isfinite(peft_gates.GateConfig().sparsity_weight)


# --------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_sft_trainer_smollm2_units_applies_the_term(tmp_path):
    """SmolLM2-135M (real weights) + SFTTrainer + unit gates + TRL defaults (checkpointing) + GA 2."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    from peft_gates import assets

    try:
        model, tokenizer = assets.load_smollm2()
        train, _ = assets.load_movie_sentences()
    except (RuntimeError, OSError, ImportError) as err:
        pytest.skip(f"real assets unavailable: {err}")
    rows = assets.build_sft_examples(tokenizer, train[:16])
    config = peft_gates.GateConfig(placement="units", sparsity_weight=50.0, target_sparsity=0.3)
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
        disable_tqdm=True, seed=0, max_length=128,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=config,
    )
    assert trainer.args.gradient_checkpointing
    attach(trainer)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*did not run a training forward.*")
        trainer.train()
    curves = g.curves(trainer)
    assert set(METRIC_KEYS) <= set(curves) and curves["sparsity_lambda"] == [50.0] * 3
    assert curves["sparsity_loss"][-1] < curves["sparsity_loss"][0]
    tuner = gate_model_of(trainer.model)
    assert len(tuner.gated_layers("default")) == 2 * model.config.num_hidden_layers
    assert {p.dtype for n, p in trainer.model.named_parameters() if "peft_gates_" in n} == {torch.float32}
