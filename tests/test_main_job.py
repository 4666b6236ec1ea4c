"""The main job (README command 1) end to end on the real SmolLM2 and real data, at a reduced size.

The full default run takes minutes on 2 cores (its measured figures are in docs/benchmarks.md); this test
runs the same code path with fewer steps and sentences and checks what the job promises: accuracies of the
three models, a pruned export that reloads with the same logits and greedy tokens, and the report.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import peft
import pytest
import torch

MAIN_JOB = Path(__file__).resolve().parents[1] / "examples" / "main_job.py"


def _load_main_job():
    spec = importlib.util.spec_from_file_location("main_job", MAIN_JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults_are_the_documented_recipe():
    """The embedded default is what docs/benchmarks.md reports: units + scale gates, sigma 0.35, lambda 150
    from step 20, 200 steps at a cosine lr."""
    args = _load_main_job().parse_args([])
    assert (args.placement, args.scale_gates, args.sigma, args.steps) == ("units", "both", 0.35, 200)
    assert (args.sparsity_start, args.sparsity_warmup, args.target_sparsity) == (20, 40, 0.3)
    assert (args.sparsity_weight, args.scheduler, args.lr) == (150.0, "cosine", 5e-2)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--placement", "both", "--scale-gates", "rows"], "--scale-gates rows needs --placement units"),
        (["--steps", "20"], "--steps 20 ends before the sparsity term starts"),
        (["--test-size", "0"], "0 is not a positive integer: use an integer >= 1"),
        (["--sparsity-start", "-1"], "-1 is not a non-negative integer: use an integer >= 0"),
        (["--sparsity-warmup", "1.5"], "expected an integer >= 0, got '1.5'"),
        (["--latency-rounds", "0"], "0 is not a positive integer"),
    ],
)
def test_bad_arguments_are_refused_before_anything_loads(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load_main_job().parse_args(argv)
    assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_other_placements_default_to_no_scale_gates():
    assert _load_main_job().parse_args(["--placement", "both"]).scale_gates == "none"


@pytest.mark.slow
def test_main_job_end_to_end_small(tmp_path):
    from peft_gates import assets

    try:
        assets.load_movie_sentences()
        assets.load_smollm2()
    except (RuntimeError, OSError, ImportError) as err:
        pytest.skip(f"real assets unavailable: {err}")
    out = tmp_path / "job"
    argv = ["--steps", "8", "--train-size", "32", "--test-size", "16", "--sparsity-start", "0"]
    argv += ["--sparsity-warmup", "0", "--latency-rounds", "2", "--out", str(out)]
    results = _load_main_job().main(argv)

    saved = json.loads((out / "main_job.json").read_text())
    assert saved["pruned_accuracy"] == results["pruned_accuracy"]
    assert saved["versions"]["peft"] == peft.__version__ and saved["versions"]["torch"] == torch.__version__
    for key in ("zero_shot_accuracy", "gated_accuracy", "pruned_accuracy"):
        assert 0.0 <= results[key] <= 1.0
    # the pruned export is the gated model: same greedy tokens, logits within fp32 folding error
    assert results["reload_same_greedy_generation"] is True
    assert results["reload_max_logit_diff"] < 5e-3
    # the export is the gated model with its closed units cut out: same answers, and exactly the
    # parameters the gate statistics (planned at the same width multiple) called removable are gone
    assert results["pruned_accuracy"] == results["gated_accuracy"]
    removed = results["dense_parameters"] - results["pruned_parameters"]
    assert removed == results["gate_statistics"]["removable_parameters"]
    assert results["removed_fraction"] == pytest.approx(removed / results["dense_parameters"])
    # dense and pruned timed in 2 rotating rounds; the ratios are the best rounds', the spread round by round
    dense, pruned = results["latency"]["dense"], results["latency"]["pruned"]
    assert dense["rounds"] == pruned["rounds"] == 2 and len(results["decode_speedup_rounds"]) == 2
    assert results["prefill_speedup"] == pytest.approx(dense["prefill_ms"] / pruned["prefill_ms"])
    assert results["decode_speedup"] == pytest.approx(
        pruned["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
    )
    assert dense["prefill_ms"] == pytest.approx(1000 * min(dense["prefill_rounds_s"]))
    assert (dense["parameters"], pruned["parameters"]) == (
        results["dense_parameters"],
        results["pruned_parameters"],
    )
    assert (out / "pruned" / "compression_report.md").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert len(results["train_log"]) >= 1
    assert results["wall_seconds"] >= results["train_seconds"] > 0
