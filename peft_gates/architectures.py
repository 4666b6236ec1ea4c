"""Which slices of which Linears form one removable unit, per architecture, as a small table.

A *unit* is what the merge can physically cut out of a block:

* an MLP neuron ``j``: row ``j`` of every ``mlp_rows`` module (``gate_proj`` and ``up_proj``; fused
  ``gate_up_proj`` counts as two row segments) and column ``j`` of ``mlp_out`` (``down_proj``);
* an attention unit: one KV group under GQA (its k/v head and all its query heads), one head
  otherwise: the head's rows of q/k/v (or of a fused ``qkv`` module) and its column block of ``attn_out``.

The module names are relative to one block (an element of the ``layers`` ModuleList). The
architecture knowledge lives here and nowhere else; the tuner and the merge only read this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Coupled structures of one transformer family.

    Attributes:
        layers: suffix of the ModuleList of blocks (``"layers"``, ``"h"``, ``"encoder.layer"``).
        mlp_rows: modules whose output rows are MLP neurons (in order). For a fused module each
            neuron owns one row per segment (``fused_mlp_segments``).
        mlp_out: module whose input columns are MLP neurons.
        q, k, v: attention projections with separate weights (None when fused into ``qkv``).
        qkv: fused q/k/v projection whose rows are ``[q heads | k heads | v heads]``.
        attn_out: module whose input column blocks are attention heads.
        heads_attr, kv_heads_attr, hidden_attr, head_dim_attr, intermediate_attr: config fields.
        fused_mlp_segments: number of row segments of a fused ``mlp_rows`` module (2 for gate_up).
    """

    layers: str
    mlp_rows: tuple[str, ...]
    mlp_out: str
    attn_out: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    heads_attr: str = "num_attention_heads"
    kv_heads_attr: str | None = "num_key_value_heads"
    hidden_attr: str = "hidden_size"
    head_dim_attr: str | None = "head_dim"
    intermediate_attr: str = "intermediate_size"
    fused_mlp_segments: int = 1

    def attention_modules(self) -> tuple[str, ...]:
        return tuple(m for m in (self.q, self.k, self.v, self.qkv) if m is not None)

    def block_linears(self) -> tuple[str, ...]:
        """Every Linear of one block: where ``GateConfig.scale_gates`` puts scale gates."""
        return (*self.attention_modules(), self.attn_out, *self.mlp_rows, self.mlp_out)


_LLAMA = ArchSpec(
    layers="layers",
    mlp_rows=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    attn_out="self_attn.o_proj",
)
_PHI3 = ArchSpec(
    layers="layers",
    mlp_rows=("mlp.gate_up_proj",),
    mlp_out="mlp.down_proj",
    qkv="self_attn.qkv_proj",
    attn_out="self_attn.o_proj",
    fused_mlp_segments=2,
)
_GPT2 = ArchSpec(
    layers="h",
    mlp_rows=("mlp.c_fc",),
    mlp_out="mlp.c_proj",
    qkv="attn.c_attn",
    attn_out="attn.c_proj",
    heads_attr="n_head",
    kv_heads_attr=None,
    hidden_attr="n_embd",
    head_dim_attr=None,
    intermediate_attr="n_inner",
)
_BERT = ArchSpec(
    layers="encoder.layer",
    mlp_rows=("intermediate.dense",),
    mlp_out="output.dense",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    attn_out="attention.output.dense",
    kv_heads_attr=None,
    head_dim_attr=None,
)

#: ``config.model_type`` -> coupled structures. Extend here to support a new family.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "phi3": _PHI3,
    "gpt2": _GPT2,
    "bert": _BERT,
    "roberta": _BERT,
}


@dataclass(frozen=True)
class AttentionShape:
    """Head layout of one model: what an attention unit is, in columns of ``attn_out``."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def heads_per_unit(self) -> int:
        """Query heads per removable unit: a whole KV group under GQA, one head otherwise."""
        return self.num_heads // self.num_kv_heads

    @property
    def num_units(self) -> int:
        return self.num_kv_heads

    @property
    def unit_width(self) -> int:
        return self.heads_per_unit * self.head_dim


#: model_type suffix of pruned exports with per-layer widths (``"llama_pruned"``, see peft_gates.export).
PRUNED_SUFFIX = "_pruned"


def arch_spec(model_type: str | None) -> ArchSpec | None:
    """The table entry for ``model_type`` (None for families the merge cannot cut yet).

    A pruned export (``"<family>_pruned"``) maps to its family, so a pruned model can be gated and
    pruned again.
    """
    return ARCHITECTURES.get((model_type or "").removesuffix(PRUNED_SUFFIX))


def attention_shape(spec: ArchSpec, config) -> AttentionShape:
    """Heads, KV heads and head_dim of ``config`` read through the field names of ``spec``."""
    heads = getattr(config, spec.heads_attr)
    kv = getattr(config, spec.kv_heads_attr, None) if spec.kv_heads_attr else None
    head_dim = getattr(config, spec.head_dim_attr, None) if spec.head_dim_attr else None
    return AttentionShape(
        num_heads=heads,
        num_kv_heads=kv or heads,
        head_dim=head_dim or getattr(config, spec.hidden_attr) // heads,
    )


def unit_weights(spec: ArchSpec, shape: AttentionShape, hidden: int) -> dict[str, int]:
    """Weights one unit's removal takes out of a block, by unit module (biases left out).

    An MLP neuron is one row of every ``mlp_rows`` segment and one column of ``mlp_out``; an attention
    unit is the rows of its query heads and of one k and one v head, and its column block of
    ``attn_out``. ``GateConfig.sparsity_scope="global"`` weighs each unit gate by this.
    """
    neuron = hidden * (len(spec.mlp_rows) * spec.fused_mlp_segments + 1)
    attention = hidden * shape.head_dim * (2 * shape.heads_per_unit + 2)
    return {spec.mlp_out: neuron, spec.attn_out: attention}


def find_blocks(model: nn.Module, spec: ArchSpec) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ModuleList of transformer blocks of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (name == spec.layers or name.endswith("." + spec.layers)):
            return name, module
    raise ValueError(
        f"no ModuleList named '*{spec.layers}' in {type(model).__name__}: the architecture table entry of "
        f"its model_type expects the blocks there; use the stock transformers class of the family, or adapt "
        "its ArchSpec in peft_gates.architectures.ARCHITECTURES"
    )
