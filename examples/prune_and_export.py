"""From a trained gate adapter to deployable checkpoints: plan, report, merge, both export layouts, checks.

1. ``PeftModel.from_pretrained(base, adapter)`` (after ``import peft_gates``);
2. ``plan_pruning``: what the merge will keep, per block, without touching the model; ``write_report``;
3. ``merge_and_unload(multiple_of=...)``: fold the gates, cut closed MLP neurons and attention units;
4. ``save_pruned(layout="per_layer")``: smallest; reloads with ``AutoModelForCausalLM`` after
   ``import peft_gates``; ``save_pruned(layout="zero_pad")``: stock config, loads with plain transformers
   and servers that need one width per model;
5. both reloaded and compared with the gated model's logits.

    python examples/prune_and_export.py          # the adapter of examples/quickstart.py on SmolLM2
    python examples/prune_and_export.py --adapter my-adapter --base ./my-base --multiple-of 64
    python examples/prune_and_export.py --smoke  # tiny random model with some gates closed by hand

The same from the shell: ``peft-gates prune --base BASE --adapter ADAPTER --out OUT``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import peft_gates
from peft_gates import assets
from peft_gates.pruning import layer_widths


def smoke_adapter() -> tuple[Path, Path]:
    """A saved tiny base and a saved units adapter whose gates close some neurons and KV groups.

    Stands in for a trained adapter: thetas set by hand (closed = -3, eval value exactly 0; open = 3).
    """
    import _smoke
    from peft import get_peft_model

    base_dir = _smoke.save_tiny_causal_lm("tiny-base")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), peft_gates.GateConfig(placement="units")
    )
    with torch.no_grad():
        for name, theta in model.named_parameters():
            if "peft_gates_" in name:
                theta.fill_(3.0)
                share = 2 if ".layers.0." in name else 4  # block 0 loses half, block 1 a quarter
                theta[: theta.numel() // share] = -3.0
    model.save_pretrained("tiny-adapter")
    return base_dir, Path("tiny-adapter")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny random model, gates closed by hand, temp dir"
    )
    parser.add_argument(
        "--adapter", default="gates-quickstart/adapter", help="trained gate adapter directory"
    )
    parser.add_argument("--base", default=None, help="base model directory (default: SmolLM2 from assets)")
    parser.add_argument("--multiple-of", type=int, default=128, help="round kept MLP widths up to this")
    parser.add_argument("--out", default="exports", help="output directory")
    args = parser.parse_args()

    if args.smoke:
        import _smoke

        _smoke.enter_smoke_mode()
        base_dir, adapter = smoke_adapter()
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        args.multiple_of = 8
    else:
        adapter = Path(args.adapter)
        if not (adapter / "adapter_config.json").is_file():
            parser.error(f"no gate adapter in {adapter}: run examples/quickstart.py first, or pass --adapter")
        base = AutoModelForCausalLM.from_pretrained(args.base) if args.base else assets.load_smollm2()[0]
    out = Path(args.out)

    model = PeftModel.from_pretrained(base, adapter).eval()  # 1
    inputs = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gated_logits = model(input_ids=inputs).logits

    plan = peft_gates.plan_pruning(model, multiple_of=args.multiple_of)  # 2
    peft_gates.write_report(plan, out / "report")
    print(f"plan: {plan.params_total_before:,} -> {plan.params_total_after:,} parameters")
    for layer in plan.layers[:4]:
        print(
            f"  block {layer.index}: {len(layer.kept_neurons)}/{layer.intermediate_size} neurons, "
            f"{layer.kept_heads}/{layer.num_units * layer.heads_per_unit} heads"
        )

    pruned = model.merge_and_unload(multiple_of=args.multiple_of)  # 3
    per_layer = peft_gates.save_pruned(pruned, out / "per_layer", report=plan, overwrite=True)  # 4
    zero_pad = peft_gates.save_pruned(
        pruned, out / "zero_pad", layout="zero_pad", report=plan, overwrite=True
    )

    for path in (per_layer, zero_pad):  # 5
        reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            gap = (reloaded(input_ids=inputs).logits - gated_logits).abs().max().item()
        widths = sorted({w["intermediate_size"] for w in layer_widths(reloaded)})
        print(
            f"{path}: {type(reloaded).__name__} ({reloaded.config.model_type}), MLP widths {widths}, "
            f"{sum(p.numel() for p in reloaded.parameters()):,} parameters, max |logit - gated| {gap:.1e}"
        )


if __name__ == "__main__":
    main()
