"""Experiment: start the unit gates from an importance ranking instead of the paper's uniform init.

Measured and not adopted (docs/benchmarks.md, "An importance prior on the gate init"): on MiniLM at target
0.4 both directions of the prior cost about 4 points against the paper's init, so the library keeps the
paper's init and this stays an experiment script.

Before training, one calibration pass over the first ``--prior-batches`` training batches scores each unit
under the sparsity term (a column of a regularized column-gate vector: an MLP neuron's down-projection
column, an attention unit's column block of the output projection) by the norm of its contribution to the
layer output on those batches, ``||X_g W_g^T||_F`` (for a single column ``||x_j|| ||W[:, j]||``, Wanda's
score). Each gate's raw theta then moves by ``spread * rank`` when ``--prior-spread`` is positive (important
units start further from closing; the least important keep the recipe's init) or by
``spread * (1 - rank)`` when it is negative (the least important start closer to closing; the most
important keep the init), with ``rank`` in [0, 1] within its gate vector. Every other flag is
benchmarks/accuracy.py's; the JSON's ``meta.argv`` records the prior's flags.

The prior is applied from ``peft_gates.training.attach``, which both parts of accuracy.py call on the
built Trainer just before training, so the experiment needs no flag in the benchmark or the library.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):  # `python benchmarks/importance_prior.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import accuracy, common  # noqa: E402
from peft_gates import training  # noqa: E402
from peft_gates.layer import GateLayer  # noqa: E402

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def regularized_column_layers(model: nn.Module, adapter: str = "default") -> list[GateLayer]:
    """The gate layers whose column gates are under the sparsity term (the unit gates)."""
    layers = training.gate_model_of(model).gated_layers(adapter).values()
    return [layer for layer in layers if "columns" in layer.regularized[adapter]]


def contribution_scores(layer: GateLayer, gram: torch.Tensor) -> torch.Tensor:
    """``||X_g W_g^T||_F^2`` per column group ``g``, from the inputs' per-group Gram ``X_g^T X_g``.

    ``||X_g W_g^T||_F^2 = trace(W_g^T W_g X_g^T X_g)``, so a (groups, d, d) Gram accumulated over batches
    scores every group without keeping activations.
    """
    groups, size = gram.shape[0], gram.shape[1]
    weight = layer.get_base_layer().weight.float()  # (out, in): every gated unit layer here is a Linear
    blocks = weight.t().reshape(groups, size, -1)
    return (gram * torch.einsum("gio,gjo->gij", blocks, blocks)).sum((1, 2))


@torch.no_grad()
def apply_prior(model: nn.Module, batches: Sequence[dict[str, Any]], spread: float) -> int:
    """Score the unit gates on ``batches``, shift their thetas by the ranking; returns how many vectors."""
    layers = regularized_column_layers(model)
    grams: dict[nn.Module, torch.Tensor] = {}

    def record(module: GateLayer, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
        size = module.column_group["default"]
        x = inputs[0].detach().float().reshape(-1, module.in_features // size, size)
        grams[module] = grams.get(module, 0) + torch.einsum("tgi,tgj->gij", x, x)

    hooks = [layer.register_forward_hook(record) for layer in layers]
    was_training, device = model.training, next(model.parameters()).device
    model.eval()  # at the recipes' init the eval gates are (within noise) 1: the pass sees the base model
    try:
        for batch in batches:
            model(**{k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS})
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    for layer in layers:
        scores = contribution_scores(layer, grams[layer])
        rank = scores.argsort().argsort().float() / max(scores.numel() - 1, 1)  # 0 = least important
        theta = layer.peft_gates_col["default"]
        theta.add_((spread * rank if spread > 0 else spread * (1 - rank)).to(theta.device))
    return len(layers)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run benchmarks/accuracy.py with the prior applied to every gated run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    add = parser.add_argument
    add("--prior-spread", type=float, required=True, help="theta shift at the ranking's far end")
    add("--prior-batches", type=int, default=16, help="training batches scored before training")
    args, rest = parser.parse_known_args(argv)
    if args.prior_spread == 0 or args.prior_batches < 1:
        parser.error(
            f"--prior-spread {args.prior_spread} / --prior-batches {args.prior_batches}: the spread must be "
            "non-zero (0 is the plain accuracy.py run) and at least one batch is needed"
        )
    attach = training.attach

    def attach_with_prior(trainer: Any, *a: Any, **k: Any) -> Any:
        batches = []
        for batch in trainer.get_train_dataloader():
            batches.append(batch)
            if len(batches) == args.prior_batches:
                break
        apply_prior(trainer.model, batches, args.prior_spread)
        return attach(trainer, *a, **k)

    training.attach = attach_with_prior
    try:
        return accuracy.main(rest)
    finally:
        training.attach = attach


if __name__ == "__main__":
    raise SystemExit(common.cli(main))
