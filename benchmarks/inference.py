"""Inference speed of dense vs pruned models: prefill latency and batched decode throughput.

Pruned models are made by the real code path: the model is wrapped with ``GateConfig(placement="units")``
(one gate per MLP neuron and per attention unit, a KV group under GQA), the gate thetas of the least
important units are set closed (theta = -3, eval value exactly 0) and the others fully open (theta = 3,
eval value exactly 1), and ``prune_and_unload`` cuts them out. Importance is a weight-norm proxy
(neuron: product of the norms of its down_proj column and gate/up rows; unit: norm of its o_proj
columns times its v rows): this benchmark measures speed, not quality, and any ranking gives the same
shapes. Every block loses the same share, split between attention and MLP in proportion to their
parameters (whole units only, rounded; the MLP makes up the rest), to hit the requested share of block
parameters; the table reports what was realized.

Each sparsity is built twice: ``multiple_of=1`` (exact widths) and ``multiple_of=128`` (kept MLP widths
rounded up to a multiple of 128 by re-keeping the most open closed neurons as zeros), because on GPUs odd
widths can make a pruned model slower than the dense one (docs/concepts.md, "Why kept widths are rounded").

Measured: prefill = one forward over ``--prefill-batch x --prefill-len`` tokens with no cache, logits of
the last position only (what generation needs); decode = ``--new-tokens`` greedy steps of a manual loop
with a DynamicCache after a ``--prompt-len`` prompt at ``--decode-batch``, timing only the decode steps
(HF ``generate`` would mix in prefill and its own overhead). Median of ``--repeats`` after ``--warmup``,
synchronized on CUDA. Every pruned model is also checked against its gated model (max |logit diff|).

Defaults: SmolLM2-135M-Instruct real weights on CPU in fp32. GPU: ``--device cuda`` (bf16); add
``--size 1b`` for a Llama-3.2-1B-shaped model from its config.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from peft_gates.cli import non_negative_int, positive_int
from peft_gates.latency import measure_decode, measure_prefill, rotate_rounds

try:  # `python -m benchmarks.inference` / tests
    from benchmarks import common
except ImportError:  # `python benchmarks/inference.py`
    import common  # type: ignore[no-redef]

OPEN, CLOSED = 3.0, -3.0  # eval gate value exactly 1 and exactly 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.inference",
        description="Dense vs pruned latency: prefill at batch x seq and batched decode tokens/s, at several "
        "shares of block parameters removed (units closed through gate thetas and cut by the real "
        "prune_and_unload), with and without width alignment (multiple_of 128 vs 1). Prints a table, "
        "writes <out>/<name>.json and a PNG of speedup vs parameters removed.",
        formatter_class=common.HelpFormatter,
    )
    common.add_model_args(parser)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="auto = float32 on CPU, bfloat16 on CUDA")  # fmt: skip
    parser.add_argument(
        "--sparsities", default="0.1,0.2,0.3,0.4", help="shares of block parameters to remove"
    )
    parser.add_argument("--multiple-of", default="1,128", help="width alignments to compare")
    parser.add_argument("--prefill-batch", type=positive_int, default=1, help="sequences per prefill")
    parser.add_argument("--prefill-len", type=positive_int, default=128, help="tokens per prefill sequence")
    parser.add_argument("--decode-batch", type=positive_int, default=8, help="sequences decoded together")
    parser.add_argument(
        "--prompt-len", type=positive_int, default=32, help="prompt tokens before decoding (untimed)"
    )
    parser.add_argument(
        "--new-tokens", type=positive_int, default=16, help="timed decode steps (none: --skip-decode)"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=3, help="timed repeats (the median is reported)"
    )
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed repeats first")
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="time every model this many times, all models once per round in a rotating order; keep each "
        "model's best round (noise on a shared machine only ever adds time). Holds every model in memory",
    )
    parser.add_argument("--skip-decode", action="store_true", help="measure prefill only")
    parser.add_argument("--name", default="inference", help="stem of the output files")
    common.add_common_args(parser)
    return parser


# --------------------------------------------------------------------------------------------- pruned models


@torch.no_grad()
def importance(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block: (neuron scores, attention-unit scores), weight-norm proxies (higher = keep)."""
    from peft_gates.architectures import find_blocks
    from peft_gates.pruning import model_spec

    spec, shape = model_spec(model)
    if spec.v is None:
        raise SystemExit(
            f"error: {model.config.model_type} has fused qkv; this benchmark handles q/k/v models"
        )
    _, blocks = find_blocks(model, spec)
    out = []
    for block in blocks:
        down = block.get_submodule(spec.mlp_out).weight.float()
        neurons = down.norm(dim=0)
        for name in spec.mlp_rows:
            neurons = neurons * block.get_submodule(name).weight.float().norm(dim=1)
        o = block.get_submodule(spec.attn_out).weight.float()
        units = o.view(o.shape[0], shape.num_units, shape.unit_width).norm(dim=(0, 2))
        v = block.get_submodule(spec.v).weight.float()
        units = units * v.view(shape.num_units, shape.head_dim, -1).norm(dim=(1, 2))
        out.append((neurons, units))
    return out


def closing_plan(model: torch.nn.Module, fraction: float) -> dict[str, Any]:
    """How many neurons and units every block closes to remove ``fraction`` of its Linear parameters.

    The attention share of the budget is ``fraction`` of its units (rounded to whole units); the MLP
    takes the rest, so the total is hit to within one neuron.
    """
    from peft_gates.pruning import model_spec

    spec, shape = model_spec(model)
    config = model.config
    hidden, inter = config.hidden_size, config.intermediate_size
    neuron_params = hidden * (len(spec.mlp_rows) + 1)
    unit_params = hidden * (shape.unit_width * 2 + 2 * shape.head_dim)  # q rows + o cols + k rows + v rows
    block_params = neuron_params * inter + unit_params * shape.num_units
    units = min(shape.num_units - 1, round(fraction * shape.num_units))
    neurons = round((fraction * block_params - units * unit_params) / neuron_params)
    neurons = max(0, min(inter - 1, neurons))
    return {"units": units, "neurons": neurons, "target_block_fraction": fraction}


def gated_model(base: torch.nn.Module, scores: list, plan: dict[str, Any]) -> torch.nn.Module:
    """A copy of ``base`` with unit gates whose thetas close the ``plan``'s least important units."""
    from peft import get_peft_model

    from peft_gates import GateConfig
    from peft_gates.architectures import find_blocks
    from peft_gates.pruning import model_spec

    model = get_peft_model(copy.deepcopy(base), GateConfig(placement="units"))
    spec, _ = model_spec(base)
    _, blocks = find_blocks(model.base_model.model, spec)
    with torch.no_grad():
        for block, (neuron_scores, unit_scores) in zip(blocks, scores, strict=True):
            for name, scores_, count in ((spec.mlp_out, neuron_scores, plan["neurons"]),
                                         (spec.attn_out, unit_scores, plan["units"])):  # fmt: skip
                theta = block.get_submodule(name).peft_gates_col["default"]
                theta.fill_(OPEN)
                if count:
                    theta[torch.argsort(scores_)[:count]] = CLOSED
    return model.eval()


def prune(model: torch.nn.Module, multiple_of: int) -> torch.nn.Module:
    """The pruning merge (one call into peft_gates.pruning)."""
    from peft_gates.pruning import prune_and_unload

    return prune_and_unload(model, multiple_of=multiple_of)


def plan_totals(model: torch.nn.Module, multiple_of: int) -> dict[str, Any]:
    """Realized removal and per-block widths the merge will produce (read from the pruning plan)."""
    from peft_gates.pruning import plan_pruning

    plan = plan_pruning(model, multiple_of=multiple_of)
    totals = plan.to_dict()["totals"]
    widths = plan.widths()
    return {
        "removed_block": 1 - totals["params_blocks_after"] / totals["params_blocks_before"],
        "removed_model": plan.params_removed / plan.params_total_before,
        "intermediate_sizes": sorted({w["intermediate_size"] for w in widths}),
        "heads": sorted({w["num_attention_heads"] for w in widths}),
        "kv_heads": sorted({w["num_key_value_heads"] for w in widths}),
    }


# --------------------------------------------------------------------------------------------- timing


def measure(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Prefill latency and decode throughput of one model (already on ``device``).

    The timing itself is :mod:`peft_gates.latency` (the procedure behind ``peft-gates bench``), so the
    benchmark and the command line measure the same way; only the shapes and the report are set here.
    """
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prefill = torch.randint(0, vocab, (args.prefill_batch, args.prefill_len), generator=gen).to(device)
    prompt = torch.randint(0, vocab, (args.decode_batch, args.prompt_len), generator=gen).to(device)
    timing = measure_prefill(model, prefill, repeats=args.repeats, warmup=args.warmup)
    out: dict[str, Any] = {
        "prefill": timing.to_dict(),
        "prefill_ms": 1000 * timing.median_s,
        "prefill_tokens_per_s": prefill.numel() / timing.median_s,
    }
    if args.skip_decode:
        return out
    decode = measure_decode(model, prompt, args.new_tokens, repeats=args.repeats, warmup=args.warmup)
    out["decode"] = decode.to_dict()
    out["decode_ms_per_step"] = 1000 * decode.median_s / args.new_tokens
    out["decode_tokens_per_s"] = args.decode_batch * args.new_tokens / decode.median_s
    return out


def measure_rounds(
    rows: list[dict[str, Any]], models: list[torch.nn.Module], args: argparse.Namespace, device: torch.device
) -> None:
    """Time every model ``args.rounds`` times in a rotating order (:func:`peft_gates.latency.rotate_rounds`).

    Each row gets every round's measurement under ``"rounds"`` and, as its figures, the fastest prefill
    and the highest decode throughput over the rounds: on a shared CPU, interference only ever slows a
    measurement down, so the best round is the least disturbed one.
    """
    with tqdm(total=args.rounds, desc="rounds", unit="round", disable=args.rounds == 1) as bar:
        timed = rotate_rounds(
            dict(enumerate(models)), lambda model: measure(model, args, device), args.rounds, bar.update
        )
    for i, row in enumerate(rows):
        row["rounds"] = timed[i]
        best_prefill = min(row["rounds"], key=lambda m: m["prefill_ms"])
        row.update({k: best_prefill[k] for k in ("prefill", "prefill_ms", "prefill_tokens_per_s")})
        if not args.skip_decode:
            best_decode = max(row["rounds"], key=lambda m: m["decode_tokens_per_s"])
            row.update({k: best_decode[k] for k in ("decode", "decode_ms_per_step", "decode_tokens_per_s")})


@torch.no_grad()
def logit_gap(reference: torch.nn.Module, candidate: torch.nn.Module, vocab: int) -> float:
    """Max |logit difference| on a fixed 2 x 16 batch: the pruned model must equal its gated model."""
    x = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    return float((reference(input_ids=x).logits - candidate(input_ids=x).logits).abs().max())


# --------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Build every variant, time it, print the table; returns what the JSON holds."""
    args = build_parser().parse_args(argv)
    common.setup_run(args)
    if args.weights == "real" and args.size != "135m":
        args.weights = "random"
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    fractions = common.parse_list(args.sparsities, float)
    if any(not 0 < f < 1 for f in fractions):
        raise SystemExit(
            f"error: --sparsities {args.sparsities}: every share must lie in (0, 1), e.g. 0.1,0.3"
        )
    multiples = common.parse_list(args.multiple_of, int)
    base = common.load_base_model(args.size, args.weights)  # fp32 on CPU: the copy every variant is cut from
    scores = importance(base)
    vocab = base.config.vocab_size
    variants: list[dict[str, Any]] = [{"variant": "dense", "target": 0.0, "multiple_of": None}]
    variants += [
        {"variant": f"{f:.0%} x{m}", "target": f, "multiple_of": m} for f in fractions for m in multiples
    ]
    results, models = [], []
    for variant in tqdm(variants, desc="variants", unit="model"):
        row = dict(variant)
        if variant["multiple_of"] is None:
            model = copy.deepcopy(base)
            config = base.config
            row.update(removed_block=0.0, removed_model=0.0, max_logit_diff=0.0,
                       intermediate_sizes=[config.intermediate_size], heads=[config.num_attention_heads],
                       kv_heads=[config.num_key_value_heads])  # fmt: skip
        else:
            plan = closing_plan(base, variant["target"])
            gated = gated_model(base, scores, plan)
            row.update(closed_per_block=plan, **plan_totals(gated, variant["multiple_of"]))
            model = prune(gated, variant["multiple_of"])
            reference = gated_model(base, scores, plan)  # prune consumed the first copy
            row["max_logit_diff"] = logit_gap(reference, model, vocab)
            del reference, gated
        row["params"] = common.count_parameters(model)
        results.append(row)
        models.append(model.to(device=device, dtype=dtype).eval())
    measure_rounds(results, models, args, device)
    del models
    dense = results[0]
    for row in results:
        row["prefill_speedup"] = dense["prefill_ms"] / row["prefill_ms"]
        if "decode_tokens_per_s" in row:
            row["decode_speedup"] = row["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
        row["ideal_speedup"] = 1 / (1 - row["removed_block"])
        row["widths"] = (
            f"{'/'.join(map(str, row['intermediate_sizes']))} mlp, {'/'.join(map(str, row['heads']))}"
            f"h/{'/'.join(map(str, row['kv_heads']))}kv"
        )
    model_desc = (
        f"{args.size} ({'SmolLM2 real weights' if args.weights == 'real' else 'random, from config'})"
    )
    title = (
        f"Inference, {model_desc}, {dtype} on {device}: prefill {args.prefill_batch}x{args.prefill_len}, "
        f"decode batch {args.decode_batch} x {args.new_tokens} steps after {args.prompt_len} tokens; "
        f"median of {args.repeats}, best of {args.rounds} round(s)"
    )
    cols = [
        common.Column("variant", "variant (target, multiple_of)"),
        common.Column("widths", "kept widths per block"),
        common.Column("removed_block", "block params removed", "{:.1%}"),
        common.Column("removed_model", "model params removed", "{:.1%}"),
        common.Column("prefill_ms", "prefill ms", "{:.1f}"),
        common.Column("prefill_speedup", "prefill speedup", "{:.2f}x"),
        common.Column("ideal_speedup", "ideal (block FLOPs)", "{:.2f}x"),
    ]
    if not args.skip_decode:
        cols += [
            common.Column("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
            common.Column("decode_speedup", "decode speedup", "{:.2f}x"),
        ]
    cols.append(common.Column("max_logit_diff", "max |logit diff| vs gated", "{:.1e}"))
    common.print_table(results, cols, title)
    payload = {
        "size": args.size,
        "weights": args.weights,
        "device": str(device),
        "dtype": str(dtype),
        "prefill": {"batch": args.prefill_batch, "seq_len": args.prefill_len},
        "decode": None
        if args.skip_decode
        else {"batch": args.decode_batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens},
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "results": results,
    }
    path = common.write_json(payload, args.name, args.out_dir, device=device)
    print(f"wrote {path}")
    if not args.no_plots:
        print(f"wrote {plot(results, args)}")
    return payload


def plot(results: list[dict[str, Any]], args: argparse.Namespace) -> Any:
    """Speedup vs block parameters removed, one line per alignment, prefill and decode side by side."""
    plt = common.pyplot()
    panels = ["prefill_speedup"] + ([] if args.skip_decode else ["decode_speedup"])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        for m in sorted({r["multiple_of"] for r in results if r["multiple_of"] is not None}):
            pts = [results[0]] + [r for r in results if r["multiple_of"] == m]
            ax.plot([100 * r["removed_block"] for r in pts], [r[key] for r in pts], marker="o",
                    label=f"multiple_of={m}")  # fmt: skip
        xs = sorted(100 * r["removed_block"] for r in results)
        ax.plot(xs, [1 / (1 - x / 100) for x in xs], ls="--", color="gray", label="ideal (block params)")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xlabel("block parameters removed (%)")
        ax.set_ylabel("speedup vs dense")
        ax.set_title(key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return common.save_figure(fig, args.out_dir / f"{args.name}.png")


if __name__ == "__main__":
    raise SystemExit(common.cli(main))
