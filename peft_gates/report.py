"""Compression report of a pruning plan: JSON, a markdown table and a PNG plot of kept fractions.

The realized compression differs from the training target (the sparsity term matches open
probabilities, not counts; alignment re-keeps neurons), so every export carries the real figures:
per block the kept neurons and heads, parameters and FLOPs per token before/after, and the closed
rows/columns that are not removable units and stay in the model as zeros.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from .export import write_file
from .pruning import PrunePlan

REPORT_STEM = "compression_report"


def report_dict(plan: PrunePlan) -> dict[str, Any]:
    """JSON-ready report: the plan's per-layer figures and totals, plus derived fractions."""
    data = plan.to_dict()
    totals = data["totals"]
    before, after = totals["params_model_before"], totals["params_model_after"]
    totals["params_model_removed_fraction"] = (before - after) / before if before else 0.0
    blocks_before = totals["params_blocks_before"]
    totals["params_blocks_removed_fraction"] = (
        (blocks_before - totals["params_blocks_after"]) / blocks_before if blocks_before else 0.0
    )
    flops_before = totals["flops_per_token_before"]
    totals["flops_per_token_removed_fraction"] = (
        (flops_before - totals["flops_per_token_after"]) / flops_before if flops_before else 0.0
    )
    totals["zeroed_not_removable"] = sum(
        counts["rows"] + counts["columns"]
        for entry in [*(layer["zeroed"] for layer in data["layers"]), data["other_zeroed"]]
        for counts in entry.values()
    )
    return data


def _zeroed_text(zeroed: dict[str, dict[str, int]]) -> str:
    parts = [f"{name}: {c['rows']}r/{c['columns']}c" for name, c in zeroed.items()]
    return ", ".join(parts) if parts else "-"


def report_markdown(plan: PrunePlan) -> str:
    """A markdown table, one row per block, then the totals."""
    data = report_dict(plan)
    lines = [
        f"# Compression report ({data['model_type']}, adapters {', '.join(data['adapter_names'])})",
        "",
        f"multiple_of={data['multiple_of']}, min_units={data['min_units']}, seq_len={data['seq_len']}",
        "",
    ]
    if not data["supported"]:
        lines += [
            f"model_type {data['model_type']!r} has no ArchSpec entry: gates folded, nothing removed.",
            "",
        ]
    lines += [
        "| layer | neurons kept | heads kept (kv) | params before | params after "
        "| FLOPs/token before | FLOPs/token after | zeroed, not removable (rows r / columns c) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layer in data["layers"]:
        lines.append(
            f"| {layer['index']} | {layer['kept_intermediate_size']} of {layer['intermediate_size']} "
            f"| {layer['kept_heads']} ({layer['kept_kv_heads']}) "
            f"of {layer['num_heads']} ({layer['num_units']}) "
            f"| {layer['params_before']:,} | {layer['params_after']:,} "
            f"| {layer['flops_before']:,} | {layer['flops_after']:,} | {_zeroed_text(layer['zeroed'])} |"
        )
    totals = data["totals"]
    lines += [
        "",
        f"- model parameters: {totals['params_model_before']:,} -> {totals['params_model_after']:,} "
        f"({totals['params_model_removed_fraction']:.1%} removed)",
        f"- block Linears: {totals['params_blocks_before']:,} -> {totals['params_blocks_after']:,} "
        f"({totals['params_blocks_removed_fraction']:.1%} removed)",
        f"- FLOPs per token: {totals['flops_per_token_before']:,} -> {totals['flops_per_token_after']:,} "
        f"({totals['flops_per_token_removed_fraction']:.1%} removed)",
        f"- closed rows/columns kept as zeros (not removable units): {totals['zeroed_not_removable']:,}",
    ]
    if data["other_zeroed"]:
        lines.append(f"- outside the blocks: {_zeroed_text(data['other_zeroed'])}")
    return "\n".join(lines) + "\n"


def plot_kept_fraction(plan: PrunePlan, path: str | os.PathLike) -> Path:
    """PNG of the kept fraction of MLP neurons and attention heads per block.

    Draws on a bare Agg canvas instead of pyplot, so it neither needs a display nor changes the
    caller's matplotlib backend; matplotlib is imported only here (optional dependency).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    index = [layer.index for layer in plan.layers]
    mlp = [len(layer.kept_neurons) / layer.intermediate_size for layer in plan.layers]
    attn = [len(layer.kept_units) / layer.num_units for layer in plan.layers]
    fig = Figure(figsize=(max(4.0, 0.25 * len(index) + 2), 3.2))
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.4
    ax.bar([i - width / 2 for i in index], mlp, width, label="MLP neurons")
    ax.bar([i + width / 2 for i in index], attn, width, label="attention heads")
    ax.set_xlabel("layer")
    ax.set_ylabel("kept fraction")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{plan.model_type}: kept per layer (multiple_of={plan.multiple_of})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    canvas.print_png(str(path))
    return Path(path)


def write_report(plan: PrunePlan, out_dir: str | os.PathLike, stem: str = REPORT_STEM) -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``.

    The PNG needs matplotlib (optional) and a supported family (per-layer figures); without them the
    text reports are still written. Each file is replaced whole (:func:`~peft_gates.export.write_file`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report_dict(plan), indent=2) + "\n"
    paths = [
        write_file(out / f"{stem}.json", lambda tmp: tmp.write_text(text)),
        write_file(out / f"{stem}.md", lambda tmp: tmp.write_text(report_markdown(plan))),
    ]
    if not plan.layers:
        return paths
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn(
            "matplotlib is not installed, so the compression report has no PNG plot; "
            "pip install 'peft-gates[report]' to get it",
            stacklevel=2,
        )
        return paths
    paths.append(write_file(out / f"{stem}.png", lambda tmp: plot_kept_fraction(plan, tmp)))
    return paths
