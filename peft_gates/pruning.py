"""The pruning merge: fold the eval gates into the weights and cut closed units out of every block.

A gate adapter ends with gates that are exactly 0 (closed), strictly between 0 and 1 (learned scales)
or 1. :func:`plan_pruning` reads them, without touching the model, and decides per block which MLP
neurons and which attention units (a KV group under GQA, a head otherwise; see
:mod:`peft_gates.architectures`) go. :func:`prune_and_unload` then folds every gate value into a
fresh dense copy of its Linear (``y = ((x * z_c) W^T + b) * z_r`` becomes ``y = x W'^T + b'``),
unloads the PEFT wrappers and slices the closed units out, so the result is a smaller plain
transformers model whose logits equal the gated model's eval logits.

Slicing, zero-padding (the stock ``zero_pad`` export) and rebuilding a per-layer model from its
config (:mod:`peft_gates.export`) all go through one mechanism: :func:`block_indices` maps kept
neurons and units to kept rows and columns of each Linear of a block (``-1`` = a zero row), and
:func:`resize_block` rebuilds the Linears and the per-layer attributes the attention modules read at
run time.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from tqdm.auto import tqdm
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from . import gates
from .architectures import ArchSpec, AttentionShape, arch_spec, attention_shape, find_blocks
from .layer import GateLayer, combine, in_out_features
from .quantization import dequantize_weight, is_quantized_linear, mark_dequantized

#: Kept MLP widths are rounded up to a multiple of this. Measured on an H100 (shared/notes/method.md):
#: a Llama block with an odd kept width ran at 0.34-0.65x the dense speed (pruning made it SLOWER),
#: while the same widths rounded to multiples of 128 ran 1.09-1.29x faster.
DEFAULT_MULTIPLE_OF = 128


@dataclass
class LayerPlan:
    """What the merge keeps of one block, and what that costs.

    Attributes:
        index: block index.
        intermediate_size: MLP width before pruning.
        kept_neurons: kept MLP neurons (sorted), after alignment and ``min_units``.
        closed_neurons: neurons with a closed gate (before alignment re-keeps some as zeros).
        num_units: attention units before pruning (KV heads; heads when there is no GQA).
        kept_units: kept attention units (sorted).
        closed_units: units closed by their v rows or attn_out columns (before ``min_units``).
        heads_per_unit: query heads per unit.
        head_dim: width of one head.
        params_before, params_after: weights + biases of the block's pruned Linears.
        flops_before, flops_after: FLOPs per token of those Linears (2 per weight) plus attention
            scores and values at the plan's ``seq_len``.
        zeroed: closed rows/columns that stay in the model as zeros (not part of a removed unit:
            closed q/k rows, residual-side columns, partly closed heads), by module.
    """

    index: int
    intermediate_size: int
    kept_neurons: list[int]
    closed_neurons: int
    num_units: int
    kept_units: list[int]
    closed_units: int
    heads_per_unit: int
    head_dim: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    zeroed: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def kept_heads(self) -> int:
        return len(self.kept_units) * self.heads_per_unit

    def widths(self) -> dict[str, int]:
        """Per-layer sizes as recorded in the pruned config (``pruned_layers``)."""
        return {
            "intermediate_size": len(self.kept_neurons),
            "num_attention_heads": self.kept_heads,
            "num_key_value_heads": len(self.kept_units),
        }


@dataclass
class PrunePlan:
    """Per-block decisions of the pruning merge, computed without modifying the model."""

    model_type: str
    adapter_names: list[str]
    multiple_of: int
    min_units: int
    seq_len: int
    supported: bool
    num_heads: int
    num_kv_heads: int
    layers: list[LayerPlan]
    params_total_before: int
    other_zeroed: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def params_removed(self) -> int:
        return sum(layer.params_before - layer.params_after for layer in self.layers)

    @property
    def params_total_after(self) -> int:
        """Parameters of the whole pruned model (adapter parameters excluded)."""
        return self.params_total_before - self.params_removed

    @property
    def flops_before(self) -> int:
        return sum(layer.flops_before for layer in self.layers)

    @property
    def flops_after(self) -> int:
        return sum(layer.flops_after for layer in self.layers)

    def widths(self) -> list[dict[str, int]]:
        return [layer.widths() for layer in self.layers]

    def to_dict(self, include_indices: bool = False) -> dict[str, Any]:
        """JSON-ready summary; kept indices only on request (they are long for real models)."""
        layers = []
        for layer in self.layers:
            entry = asdict(layer)
            entry.update(
                num_heads=layer.num_units * layer.heads_per_unit,
                kept_intermediate_size=len(layer.kept_neurons),
                kept_heads=layer.kept_heads,
                kept_kv_heads=len(layer.kept_units),
            )
            if not include_indices:
                del entry["kept_neurons"], entry["kept_units"]
            layers.append(entry)
        return {
            "model_type": self.model_type,
            "adapter_names": list(self.adapter_names),
            "multiple_of": self.multiple_of,
            "min_units": self.min_units,
            "seq_len": self.seq_len,
            "supported": self.supported,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "layers": layers,
            "other_zeroed": self.other_zeroed,
            "totals": {
                "params_model_before": self.params_total_before,
                "params_model_after": self.params_total_after,
                "params_blocks_before": sum(layer.params_before for layer in self.layers),
                "params_blocks_after": sum(layer.params_after for layer in self.layers),
                "flops_per_token_before": self.flops_before,
                "flops_per_token_after": self.flops_after,
            },
        }


# --------------------------------------------------------------------------------------------------
# One mechanism for slicing, padding and rebuilding: kept units -> kept rows / columns -> new Linears
# --------------------------------------------------------------------------------------------------


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _unit_rows(units: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of the ``width``-wide blocks of ``units`` (a ``-1`` unit gives ``-1`` rows)."""
    rows = units[:, None] * width + torch.arange(width)
    return torch.where(units[:, None] >= 0, rows, -1).reshape(-1)


def block_indices(
    spec: ArchSpec, shape: AttentionShape, intermediate_size: int, neurons: torch.Tensor, units: torch.Tensor
) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Kept (output rows, input columns) of each Linear of one block; ``None`` keeps all, ``-1`` is a zero.

    ``shape`` and ``intermediate_size`` describe the block as it is now; ``neurons`` and ``units``
    index into it. Under GQA, unit ``u`` is KV head ``u`` and query heads ``u * heads_per_unit ...``
    (the order ``repeat_kv`` pairs them in), so its q rows and attn_out columns are one contiguous
    ``unit_width`` block.
    """
    neuron_rows = torch.cat(
        [
            torch.where(neurons >= 0, neurons + s * intermediate_size, -1)
            for s in range(spec.fused_mlp_segments)
        ]
    )
    out: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {
        name: (neuron_rows, None) for name in spec.mlp_rows
    }
    out[spec.mlp_out] = (None, neurons)
    q_rows = _unit_rows(units, shape.unit_width)
    kv_rows = _unit_rows(units, shape.head_dim)
    if spec.qkv is not None:
        q_size = shape.num_heads * shape.head_dim
        kv_size = shape.num_kv_heads * shape.head_dim
        k_rows = torch.where(kv_rows >= 0, kv_rows + q_size, -1)
        v_rows = torch.where(kv_rows >= 0, kv_rows + q_size + kv_size, -1)
        out[spec.qkv] = (torch.cat([q_rows, k_rows, v_rows]), None)
    else:
        out[spec.q] = (q_rows, None)
        out[spec.k] = (kv_rows, None)
        out[spec.v] = (kv_rows, None)
    out[spec.attn_out] = (None, q_rows)
    return out


def _take(tensor: torch.Tensor, index: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``tensor.index_select(dim, index)`` where ``-1`` entries give zeros (the zero-pad layout)."""
    if index is None:
        return tensor
    index = index.to(tensor.device)
    valid = index >= 0
    out = tensor.index_select(dim, index.clamp(min=0))
    if tensor.device.type != "meta" and not bool(valid.all()):
        shape = [1] * tensor.dim()
        shape[dim] = -1
        out = out.masked_fill(~valid.reshape(shape), 0)
    return out


def _dense_weight(module: nn.Module, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, in) float weight and bias of a Linear-like layer; quantized layers are dequantized."""
    if not is_quantized_linear(module):
        weight = module.weight.t() if isinstance(module, Conv1D) else module.weight
        return weight.detach(), None if module.bias is None else module.bias.detach()
    weight = dequantize_weight(module)
    bias = getattr(module, "bias", None)
    # The stored weight dtype (uint8/int8) means nothing here; the bias, when present, is kept in the
    # dtype the rest of the model runs in.
    target = (
        dtype or getattr(module, "compute_dtype", None) or (bias.dtype if bias is not None else weight.dtype)
    )
    return weight.detach().to(target), None if bias is None else bias.detach().to(target)


def rebuild_linear(
    module: nn.Module,
    rows: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
    z_row: torch.Tensor | None = None,
    z_col: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    delta: torch.Tensor | None = None,
) -> nn.Module:
    """A fresh ``nn.Linear`` / ``Conv1D`` holding ``Diag(z_row) (W + delta) Diag(z_col)`` restricted to
    rows/columns.

    Gates (and the (out, in) low-rank update ``delta``) fold in fp32 and the result is cast back to the
    layer's dtype; a row gate scales the bias too (``y = ((x * z_c) W^T + b) * z_r``). Quantized layers
    come back dense in ``dtype`` (default: their compute dtype); float layers keep theirs.
    Works on meta tensors (model construction inside ``from_pretrained``).
    """
    weight, bias = _dense_weight(module, dtype)
    if z_row is not None or z_col is not None or delta is not None:
        folded = weight.float() if delta is None else weight.float() + delta.to(weight.device)
        if z_row is not None:
            folded = folded * z_row.to(folded.device)[:, None]
        if z_col is not None:
            folded = folded * z_col.to(folded.device)[None, :]
        weight = folded.to(weight.dtype)
        if bias is not None and z_row is not None:
            bias = (bias.float() * z_row.to(bias.device)).to(bias.dtype)
    weight = _take(_take(weight, rows, 0), columns, 1)
    bias = None if bias is None else _take(bias, rows, 0)
    out_features, in_features = weight.shape
    grad = bool(getattr(getattr(module, "weight", None), "requires_grad", False))
    if isinstance(module, Conv1D):
        with torch.device("meta"):
            new = Conv1D(out_features, in_features)
        new.weight = nn.Parameter(weight.t().contiguous(), requires_grad=grad)
        new.bias = nn.Parameter(
            bias.contiguous() if bias is not None else weight.new_zeros(out_features), requires_grad=grad
        )
        return new
    new = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight.contiguous(), requires_grad=grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous(), requires_grad=grad)
    return new


class LayerConfigView:
    """One attention module's view of the shared model config, with its own head counts.

    Phi-3 attention reads ``self.config.num_attention_heads`` at run time to split its fused qkv
    output, so per-layer head counts need a per-layer config. Every other attribute (the attention
    implementation, sliding window, ...) is read through to the shared config, so later changes to
    it (``set_attn_implementation``) still reach the layer.
    """

    def __init__(self, base: Any, **overrides: Any) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", overrides)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "_base" not in self.__dict__:
            raise AttributeError(name)
        overrides = self.__dict__["_overrides"]
        return overrides[name] if name in overrides else getattr(self.__dict__["_base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._overrides:
            self._overrides[name] = value
        else:
            setattr(self._base, name, value)

    def __repr__(self) -> str:
        return f"LayerConfigView({type(self._base).__name__}, {self._overrides})"


def _root_config(config: Any) -> Any:
    return config.__dict__["_base"] if isinstance(config, LayerConfigView) else config


def _block_linears(spec: ArchSpec) -> tuple[str, ...]:
    """The Linears of a block whose rows or columns are units (everything the merge resizes)."""
    return (*spec.mlp_rows, spec.mlp_out, *spec.attention_modules(), spec.attn_out)


def _attention_module(spec: ArchSpec) -> str:
    """The module doing the attention math: parent of q or qkv (``self_attn``, ``attention.self``)."""
    return _parent(spec.qkv or spec.q)


def _set_runtime_sizes(
    block: nn.Module, spec: ArchSpec, shape: AttentionShape, intermediate: int, units: int
) -> None:
    """Update the per-layer sizes that attention/MLP modules read at run time (transformers 5.x).

    Llama-style attention infers heads from projection sizes (``view(..., -1, head_dim)``) and keeps
    ``num_key_value_groups``, which removing whole KV groups preserves. GPT-2 splits ``c_attn`` by
    ``split_size`` and stores ``num_heads``; BERT/RoBERTa store ``num_attention_heads`` and
    ``all_head_size``; Phi-3 stores ``num_key_value_heads`` and reads ``config.num_attention_heads``.
    Attributes are set only where the module has them.
    """
    heads, width = units * shape.heads_per_unit, units * shape.unit_width
    attn = block.get_submodule(_attention_module(spec))
    for attr, value in (
        ("num_heads", heads),
        ("num_attention_heads", heads),
        ("num_key_value_heads", units),
        ("split_size", width),
        ("all_head_size", width),
    ):
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, value)
    config = getattr(attn, "config", None)
    if config is not None:
        root = _root_config(config)
        overrides = {spec.heads_attr: heads}
        if spec.kv_heads_attr:
            overrides[spec.kv_heads_attr] = units
        same = all(getattr(root, k, None) == v for k, v in overrides.items())
        attn.config = root if same else LayerConfigView(root, **overrides)
    mlp = block.get_submodule(_parent(spec.mlp_out))
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = intermediate


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def resize_block(
    block: nn.Module,
    spec: ArchSpec,
    shape: AttentionShape,
    neurons: torch.Tensor,
    units: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> None:
    """Keep ``neurons`` and ``units`` of ``block`` (``-1`` = a zero neuron/unit), in place.

    ``shape`` is the model's head layout (head_dim, heads per unit); the block's current widths are
    read from its Linears, so an already pruned block can be cut again.
    """
    width, now = _current_shape(block, spec, shape)
    for name, (rows, columns) in block_indices(spec, now, width, neurons, units).items():
        _replace(block, name, rebuild_linear(block.get_submodule(name), rows, columns, dtype=dtype))
    _set_runtime_sizes(block, spec, shape, len(neurons), len(units))


def block_widths(block: nn.Module, spec: ArchSpec, head_dim: int, heads_per_unit: int) -> dict[str, int]:
    """Current MLP width, heads and KV heads of one (unwrapped) block, read from its Linears."""

    def size(name: str) -> tuple[int, int]:
        module = block.get_submodule(name)
        return in_out_features(module.get_base_layer() if isinstance(module, BaseTunerLayer) else module)

    intermediate = size(spec.mlp_out)[0]
    heads = size(spec.attn_out)[0] // head_dim
    if spec.qkv is not None:
        kv = (size(spec.qkv)[1] - heads * head_dim) // (2 * head_dim)
    else:
        kv = size(spec.v)[1] // head_dim
    if heads != kv * heads_per_unit:
        raise ValueError(
            f"block has {heads} heads and {kv} KV heads, not {heads_per_unit} query heads per KV head"
        )
    return {"intermediate_size": intermediate, "num_attention_heads": heads, "num_key_value_heads": kv}


def _current_shape(block: nn.Module, spec: ArchSpec, shape: AttentionShape) -> tuple[int, AttentionShape]:
    """MLP width and head layout of ``block`` as it is now (``shape``: the model's original layout)."""
    current = block_widths(block, spec, shape.head_dim, shape.heads_per_unit)
    now = AttentionShape(current["num_attention_heads"], current["num_key_value_heads"], shape.head_dim)
    return current["intermediate_size"], now


def model_spec(model: nn.Module) -> tuple[ArchSpec, AttentionShape]:
    """Table entry and (original) head layout of a transformers model of a supported family."""
    config = model.config
    spec = arch_spec(config.model_type)
    if spec is None:
        raise ValueError(
            f"model_type={config.model_type!r} has no entry in peft_gates.architectures.ARCHITECTURES"
        )
    return spec, attention_shape(spec, config)


def layer_widths(model: nn.Module) -> list[dict[str, int]]:
    """Per-block MLP width, heads and KV heads of a (pruned or stock) model, read from its Linears."""
    spec, shape = model_spec(model)
    _, blocks = find_blocks(model, spec)
    return [block_widths(block, spec, shape.head_dim, shape.heads_per_unit) for block in blocks]


def apply_layer_widths(model: nn.Module, widths: Sequence[dict[str, int]]) -> None:
    """Shrink every block of a freshly built model to ``widths`` (leading neurons/units), in place.

    This is how a per-layer config becomes per-layer modules at load time: the stock model is built
    at the original widths, then every block is cut to its recorded sizes with the same code the
    pruning merge uses; the checkpoint then fills the weights.
    """
    spec, shape = model_spec(model)
    _, blocks = find_blocks(model, spec)
    if len(widths) != len(blocks):
        raise ValueError(f"pruned_layers lists {len(widths)} layers but the model has {len(blocks)} blocks")
    for block, width in zip(blocks, widths, strict=True):
        resize_block(
            block,
            spec,
            shape,
            torch.arange(width["intermediate_size"]),
            torch.arange(width["num_key_value_heads"]),
        )


# --------------------------------------------------------------------------------------------------
# Reading gates
# --------------------------------------------------------------------------------------------------


@dataclass
class _Gates:
    """Eval gate values (product over adapters) and openness ``tanh(theta) + 0.5`` (min over adapters).

    A gate is closed iff its eval value is exactly 0, i.e. openness <= 0; openness ranks closed
    units when alignment or ``min_units`` re-keeps some. Columns are expanded to ``in_features``.
    ``delta`` is the sum of the adapters' low-rank updates (``GateConfig.lora_rank``), (out, in) fp32.
    """

    z_row: torch.Tensor | None = None
    z_col: torch.Tensor | None = None
    open_row: torch.Tensor | None = None
    open_col: torch.Tensor | None = None
    delta: torch.Tensor | None = None


def _read_gates(
    layer: GateLayer, adapters: Iterable[str], skip_merged: bool = False, with_delta: bool = False
) -> _Gates:
    """Gate values of ``adapters`` on ``layer``; ``skip_merged`` leaves out adapters already folded in.

    Adapters already merged in place still count for the plan (their zeros are in the weights) but
    must not be folded a second time. ``with_delta`` also sums the low-rank updates; only the fold
    needs them (the plan runs on every logging step, where forming ``B A`` per layer is wasted work).
    """
    out = _Gates()
    for name in adapters:
        vectors = layer.gate_vectors(name)
        if not vectors or (skip_merged and name in layer.merged_adapters):
            continue
        for side, theta in vectors.items():
            theta = theta.detach().float().cpu()
            if side == "columns":
                theta = theta.repeat_interleave(layer.column_group[name])
            value = gates.eval_value(theta)
            if not torch.isfinite(value).all():
                raise ValueError(
                    f"adapter {name!r} has non-finite gate values on a layer; they cannot be folded"
                )
            openness = torch.tanh(theta) + gates.OPEN_OFFSET
            key = "row" if side == "rows" else "col"
            setattr(out, f"z_{key}", combine(getattr(out, f"z_{key}"), value, torch.mul))
            setattr(out, f"open_{key}", combine(getattr(out, f"open_{key}"), openness, torch.minimum))
        delta = layer.delta_weight(name) if with_delta else None
        if delta is not None:
            if not torch.isfinite(delta).all():
                raise ValueError(
                    f"adapter {name!r} has a non-finite low-rank update on a layer; it cannot be folded"
                )
            out.delta = combine(out.delta, delta.cpu(), torch.add)
    return out


def _tuner(model: nn.Module) -> BaseTuner:
    """The tuner behind a ``PeftModel`` (or the tuner itself), refusing non-gate adapters."""
    from .model import GateModel

    tuner = model.base_model if isinstance(model, PeftModel) else model
    if not isinstance(tuner, BaseTuner):
        raise TypeError(
            f"expected a PeftModel or GateModel with gate adapters, got {type(model).__name__}; wrap the "
            "model with peft.get_peft_model(model, peft_gates.GateConfig(...)) first"
        )
    if not isinstance(tuner, GateModel):
        types = sorted({str(getattr(c.peft_type, "value", c.peft_type)) for c in tuner.peft_config.values()})
        raise ValueError(
            f"the model carries {types} adapter(s), not gate adapters; merge them with their own "
            "merge_and_unload() and add a gate adapter before pruning"
        )
    for name, module in tuner.model.named_modules():
        if isinstance(module, BaseTunerLayer) and not isinstance(module, GateLayer):
            kind = f"{type(module).__module__}.{type(module).__name__}"
            raise ValueError(
                f"module {name!r} carries an unmerged {kind} adapter; merge it into the base model "
                "(merge_and_unload()) before adding gates, since pruning would drop it"
            )
    return tuner


def _adapters(tuner: BaseTuner, adapter_name: str | Sequence[str] | None) -> list[str]:
    if adapter_name is None:
        return list(tuner.active_adapters)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    missing = [n for n in names if n not in tuner.peft_config]
    if missing or not names:
        raise ValueError(
            f"adapter_name={adapter_name!r} does not exist; the model has gate adapters "
            f"{sorted(tuner.peft_config)}: pass one of them, or None for the active adapter"
        )
    return names


def _check_sizes(multiple_of: int, min_units: int) -> None:
    if not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(
            f"multiple_of={multiple_of!r} is invalid: use an integer >= 1 (1 = no alignment; "
            f"{DEFAULT_MULTIPLE_OF} keeps GPU matmuls fast)"
        )
    if not isinstance(min_units, int) or min_units < 1:
        raise ValueError(
            f"min_units={min_units!r} is invalid: use an integer >= 1 (a block keeps at least that many "
            "attention units and MLP neurons)"
        )


# --------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------


def _activation_zero_is_zero(config: Any) -> bool:
    """Whether a closed MLP input row (pre-activation exactly 0) contributes nothing: ``act(0) == 0``."""
    name = next(
        (
            getattr(config, a)
            for a in ("hidden_act", "hidden_activation", "activation_function")
            if getattr(config, a, None)
        ),
        None,
    )
    if not isinstance(name, str) or name not in ACT2FN:
        return False
    return bool(ACT2FN[name](torch.zeros(1)).eq(0).all())


def _linear_params(in_features: int, out_features: int, bias: bool) -> int:
    return in_features * out_features + (out_features if bias else 0)


def _keep_top(openness: torch.Tensor, count: int) -> list[int]:
    """Indices of the ``count`` most open entries, ascending (ties broken by index)."""
    order = torch.sort(-openness, stable=True).indices[:count]
    return sorted(order.tolist())


def _count_zeros(values: torch.Tensor | None, index: torch.Tensor | None) -> int:
    if values is None:
        return 0
    kept = values if index is None else values[index]
    return int((kept == 0).sum())


def _plan_block(
    index: int,
    block: nn.Module,
    block_gates: dict[str, _Gates],
    spec: ArchSpec,
    shape: AttentionShape,
    multiple_of: int,
    min_units: int,
    seq_len: int,
    act_zero_ok: bool,
) -> LayerPlan:
    width, shape = _current_shape(block, spec, shape)
    neuron_open = torch.full((width,), math.inf)
    if act_zero_ok:
        for name in spec.mlp_rows:
            g = block_gates.get(name)
            if g is not None and g.open_row is not None:
                neuron_open = torch.minimum(
                    neuron_open, g.open_row.view(spec.fused_mlp_segments, width).amin(0)
                )
    g = block_gates.get(spec.mlp_out)
    if g is not None and g.open_col is not None:
        neuron_open = torch.minimum(neuron_open, g.open_col)

    units = shape.num_units
    v_open = torch.full((units,), math.inf)
    v_name = spec.qkv or spec.v
    g = block_gates.get(v_name)
    if g is not None and g.open_row is not None:
        rows = g.open_row
        if spec.qkv is not None:
            start = (shape.num_heads + shape.num_kv_heads) * shape.head_dim
            rows = rows[start:]
        v_open = rows.view(units, shape.head_dim).amax(1)
    o_open = torch.full((units,), math.inf)
    g = block_gates.get(spec.attn_out)
    if g is not None and g.open_col is not None:
        o_open = g.open_col.view(units, shape.unit_width).amax(1)
    unit_open = torch.minimum(v_open, o_open)

    closed_neurons = int((neuron_open <= 0).sum())
    keep_n = max(width - closed_neurons, min(min_units, width))
    keep_n = min(width, math.ceil(keep_n / multiple_of) * multiple_of)
    kept_neurons = _keep_top(neuron_open, keep_n)
    closed_units = int((unit_open <= 0).sum())
    kept_units = _keep_top(unit_open, max(units - closed_units, min(min_units, units)))

    indices = block_indices(
        spec,
        shape,
        width,
        torch.tensor(kept_neurons, dtype=torch.long),
        torch.tensor(kept_units, dtype=torch.long),
    )
    params_before = params_after = 0
    zeroed: dict[str, dict[str, int]] = {}
    for name, (rows, columns) in indices.items():
        module = block.get_submodule(name)
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        in_f, out_f = in_out_features(base)
        bias = getattr(base, "bias", None) is not None
        params_before += _linear_params(in_f, out_f, bias)
        params_after += _linear_params(
            in_f if columns is None else len(columns), out_f if rows is None else len(rows), bias
        )
        g = block_gates.get(name)
        if g is not None:
            counts = {"rows": _count_zeros(g.z_row, rows), "columns": _count_zeros(g.z_col, columns)}
            if any(counts.values()):
                zeroed[name] = counts
    attn_flops = 4 * shape.head_dim * seq_len
    return LayerPlan(
        index=index,
        intermediate_size=width,
        kept_neurons=kept_neurons,
        closed_neurons=closed_neurons,
        num_units=units,
        kept_units=kept_units,
        closed_units=closed_units,
        heads_per_unit=shape.heads_per_unit,
        head_dim=shape.head_dim,
        params_before=params_before,
        params_after=params_after,
        flops_before=2 * params_before + attn_flops * shape.num_heads,
        flops_after=2 * params_after + attn_flops * len(kept_units) * shape.heads_per_unit,
        zeroed=zeroed,
    )


def _count_parameters(model: nn.Module, prefix: str) -> int:
    """Base-model parameters: adapter parameters and modules_to_save copies left out, quantized
    Linears counted at their logical size (bnb packs 4-bit weights)."""
    seen: set[int] = set()
    total = 0
    for name, module in model.named_modules():
        parts = name.split(".")
        if "modules_to_save" in parts or any(part.startswith(prefix) for part in parts):
            continue
        weight = getattr(module, "weight", None)
        quantized = (
            isinstance(weight, torch.Tensor)
            and not weight.dtype.is_floating_point
            and hasattr(module, "in_features")
        )
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if quantized and pname == "weight":
                total += module.in_features * module.out_features
            else:
                total += param.numel()
    return total


def plan_pruning(
    model: nn.Module,
    adapter_name: str | Sequence[str] | None = None,
    multiple_of: int = DEFAULT_MULTIPLE_OF,
    min_units: int = 1,
    seq_len: int = 0,
) -> PrunePlan:
    """Decide, per block, which MLP neurons and attention units the pruning merge removes.

    Does not modify the model (statistics and reports use it). A neuron is closed when the eval gate
    of its row in any ``mlp_rows`` module (each segment of a fused gate_up) or of its ``mlp_out``
    column is exactly 0; an attention unit when all v rows of its KV head(s), or all of its
    ``attn_out`` columns, are closed. Closed q/k rows never close a head (softmax of zeros is a
    uniform average, not zero); they fold in as zeros and are counted in ``zeroed``.

    Args:
        model: a ``PeftModel`` (or ``GateModel``) carrying gate adapters.
        adapter_name: the gate adapter(s) to fold; None = the active adapter(s), whose gates multiply
            in the forward.
        multiple_of: round each block's kept MLP width up to a multiple of this (capped at the
            original width), re-keeping the most open closed neurons as zeros. 1 disables it.
        min_units: keep at least this many attention units and MLP neurons per block (most open).
        seq_len: context length for the attention score/value FLOPs per token (0 leaves them out).
    """
    _check_sizes(multiple_of, min_units)
    if not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len={seq_len!r} is invalid: use an integer >= 0 (0 = no attention FLOPs)")
    tuner = _tuner(model)
    adapters = _adapters(tuner, adapter_name)
    base = tuner.model
    config = base.config
    spec = arch_spec(config.model_type)
    all_gates = {
        name: _read_gates(module, adapters)
        for name, module in base.named_modules()
        if isinstance(module, GateLayer) and any(module.gate_vectors(a) for a in adapters)
    }
    layers: list[LayerPlan] = []
    in_blocks: set[str] = set()
    shape = attention_shape(spec, config) if spec is not None else None
    if spec is not None:
        blocks_name, blocks = find_blocks(base, spec)
        act_zero_ok = _activation_zero_is_zero(config)
        for i, block in enumerate(blocks):
            block_gates = {}
            for name in _block_linears(spec):
                qualified = f"{blocks_name}.{i}.{name}"
                if qualified in all_gates:
                    block_gates[name] = all_gates[qualified]
                    in_blocks.add(qualified)
            layers.append(
                _plan_block(i, block, block_gates, spec, shape, multiple_of, min_units, seq_len, act_zero_ok)
            )
    other = {}
    for name, g in all_gates.items():
        if name in in_blocks:
            continue
        counts = {"rows": _count_zeros(g.z_row, None), "columns": _count_zeros(g.z_col, None)}
        if any(counts.values()):
            other[name] = counts
    return PrunePlan(
        model_type=config.model_type,
        adapter_names=adapters,
        multiple_of=multiple_of,
        min_units=min_units,
        seq_len=seq_len,
        supported=spec is not None,
        num_heads=shape.num_heads if shape else 0,
        num_kv_heads=shape.num_kv_heads if shape else 0,
        layers=layers,
        params_total_before=_count_parameters(base, tuner.prefix),
        other_zeroed=other,
    )


# --------------------------------------------------------------------------------------------------
# The merge
# --------------------------------------------------------------------------------------------------


def _keep_trained_copies(model: nn.Module, adapter_names: Sequence[str]) -> None:
    """Put the trained ``modules_to_save`` copy of the merged adapter in place of each wrapper.

    A classifier head trained beside the gates is part of the finetuned model, so the merge must keep it.
    PEFT's ``unload()`` stopped doing that in peft 0.22 (it now returns the original, untrained module;
    only a merging unload keeps the copy), and a merging unload would fold the gates a second time. So
    the copies are placed here, before ``unload()``, which then has no wrapper left to decide on. A
    wrapper that none of ``adapter_names`` trained keeps its original module.
    """
    from peft.utils import ModulesToSaveWrapper

    wrappers = [(name, m) for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    for name, wrapper in wrappers:
        trained = next((a for a in adapter_names if a in wrapper.modules_to_save), None)
        replacement = wrapper.original_module if trained is None else wrapper.modules_to_save[trained]
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, replacement)


def prune_and_unload(
    peft_model: nn.Module,
    adapter_name: str | Sequence[str] | None = None,
    multiple_of: int = DEFAULT_MULTIPLE_OF,
    min_units: int = 1,
    progressbar: bool = False,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Fold the eval gates into the weights, cut closed units out, and return the plain transformers model.

    The result's fp32 logits equal the gated model's eval logits. Every gated Linear (in blocks or
    not) gets a fresh dense copy with its gates (and low-rank update, if any) folded in; PEFT's unload
    then removes the wrappers (modules_to_save copies, e.g. a trained classifier, replace the
    originals); finally each block is cut to the plan of :func:`plan_pruning` and its per-layer
    attention attributes updated. The
    per-layer widths are recorded in ``model.config.pruned_layers`` (a registered per-family config
    subclass, so ``save_pretrained`` output reloads through the Auto classes after
    ``import peft_gates``). Consumes ``peft_model``, like PEFT's ``merge_and_unload``.

    Families outside :data:`peft_gates.architectures.ARCHITECTURES` get their gates folded (closed
    gates stay as zeros) and a warning: pruning them needs an ``ArchSpec`` entry.

    Args:
        peft_model: ``PeftModel`` / ``GateModel`` with gate adapters and no other (unmerged) adapters.
        adapter_name, multiple_of, min_units: as in :func:`plan_pruning`.
        progressbar: show progress over layers.
        dtype: dtype of layers rebuilt from quantized (bitsandbytes) bases; default: their compute
            dtype, else their bias dtype, else fp32. Float layers keep their dtype.
    """
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"dtype={dtype!r} is invalid: pass a torch.dtype such as torch.bfloat16 (or None for the "
            "default); it sets the dtype of layers rebuilt from quantized weights, float layers keep theirs"
        )
    plan = plan_pruning(peft_model, adapter_name, multiple_of=multiple_of, min_units=min_units)
    tuner = _tuner(peft_model)
    gated = [m for m in tuner.model.modules() if isinstance(m, GateLayer)]
    for layer in tqdm(gated, disable=not progressbar, desc="Folding gates"):
        g = _read_gates(layer, plan.adapter_names, skip_merged=True, with_delta=True)
        if g.z_row is not None or g.z_col is not None or g.delta is not None:
            layer.base_layer = rebuild_linear(
                layer.get_base_layer(), z_row=g.z_row, z_col=g.z_col, dtype=dtype, delta=g.delta
            )
    was_quantized = any(is_quantized_linear(m) for m in tuner.model.modules() if not isinstance(m, GateLayer))
    _keep_trained_copies(tuner.model, plan.adapter_names)
    model = tuner.unload()
    if not plan.supported:
        warnings.warn(
            f"model_type={plan.model_type!r} has no ArchSpec entry in "
            "peft_gates.architectures.ARCHITECTURES: gates were folded (closed rows/columns stay as zeros) "
            "but nothing was removed; add an entry to prune this family",
            stacklevel=2,
        )
        return model
    spec, shape = model_spec(model)
    _, blocks = find_blocks(model, spec)
    for layer_plan, block in tqdm(
        list(zip(plan.layers, blocks, strict=True)), disable=not progressbar, desc="Pruning blocks"
    ):
        resize_block(
            block,
            spec,
            shape,
            torch.tensor(layer_plan.kept_neurons, dtype=torch.long),
            torch.tensor(layer_plan.kept_units, dtype=torch.long),
            dtype=dtype,
        )
    from .export import adopt_pruned_config

    adopt_pruned_config(model, plan.widths())
    if was_quantized and not any(is_quantized_linear(m) for m in model.modules()):
        mark_dequantized(model)
    return model
