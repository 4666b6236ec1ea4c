"""Reloadable exports of a pruned model: per-layer widths, or zero-padded to a stock config.

Pruned blocks have different widths, which stock transformers configs cannot describe (only one
``intermediate_size`` and one head count per model). Two layouts:

* ``"per_layer"``: a config subclass per family (model_type ``"<family>_pruned"``, e.g.
  ``"llama_pruned"``) that keeps the original head/intermediate fields (so the family's own
  validation passes) plus ``pruned_layers`` (kept intermediate size, heads and KV heads per block),
  and model subclasses that build the stock model and then cut every block to those widths with the
  pruning merge's own resize code. Registered with the Auto classes by
  :func:`register_pruned_architectures` (run at ``import peft_gates``), so
  ``AutoModelForCausalLM.from_pretrained(out)`` rebuilds the model exactly. Smallest and fastest.
* ``"zero_pad"``: every block padded with zero neurons / zero units to the widest kept block and a
  stock config, so stock transformers (and servers that read stock configs) load it without
  ``peft_gates``. Exact: a zero neuron outputs nothing and a zero head attends uniformly over zero
  values. Gains only what the widest block lost.
"""

from __future__ import annotations

import copy
import inspect
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .architectures import ARCHITECTURES, PRUNED_SUFFIX, AttentionShape, arch_spec, attention_shape
from .pruning import (
    LayerConfigView,
    PrunePlan,
    _root_config,
    apply_layer_widths,
    block_indices,
    find_blocks,
    layer_widths,
    model_spec,
    rebuild_linear,
)

Layout = Literal["per_layer", "zero_pad"]

#: Auto classes the per-layer twins register with: (Auto class, its model_type -> class name table).
_AUTO_CLASSES = (
    ("AutoModel", "MODEL_MAPPING_NAMES"),
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
)

_CONFIGS: dict[str, type[PretrainedConfig]] = {}  # stock model_type -> pruned config class
_TWINS: dict[type, type] = {}  # stock model class -> per-layer twin


def _make_config_class(stock_type: str) -> type[PretrainedConfig]:
    stock = CONFIG_MAPPING[stock_type]
    name = f"Pruned{stock.__name__}"
    cls = type(
        name,
        (stock,),
        {
            "__module__": __name__,
            "__doc__": (
                f"{stock.__name__} with per-block widths in ``pruned_layers`` (list of dicts with "
                "``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``); the other "
                "fields keep the unpruned values. Written by peft_gates' pruning merge."
            ),
            "model_type": stock_type + PRUNED_SUFFIX,
            "stock_model_type": stock_type,
            "pruned_layers": None,
        },
    )
    globals()[name] = cls
    return cls


def _make_twin(stock: type, config_class: type[PretrainedConfig]) -> type:
    def __init__(self, config: PretrainedConfig, *args: Any, **kwargs: Any) -> None:
        stock.__init__(self, config, *args, **kwargs)
        if getattr(config, "pruned_layers", None):
            apply_layer_widths(self, config.pruned_layers)

    name = f"Pruned{stock.__name__}"
    twin = type(
        name,
        (stock,),
        {
            "__module__": __name__,
            "__doc__": f"{stock.__name__} with its blocks cut to ``config.pruned_layers`` once built.",
            "__init__": __init__,
            "config_class": config_class,
        },
    )
    globals()[name] = twin
    return twin


def register_pruned_architectures() -> None:
    """Register ``<family>_pruned`` configs and model twins with AutoConfig and the AutoModel* classes.

    Idempotent; called at ``import peft_gates``. Covers every family in
    :data:`peft_gates.architectures.ARCHITECTURES` and every Auto class the stock family has.
    """
    for stock_type in ARCHITECTURES:
        if stock_type in _CONFIGS:
            continue
        config_class = _make_config_class(stock_type)
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_name, table_name in _AUTO_CLASSES:
            class_name = getattr(modeling_auto, table_name).get(stock_type)
            if class_name is None:
                continue
            stock = getattr(transformers, class_name)
            twin = _make_twin(stock, config_class)
            _TWINS[stock] = twin
            getattr(transformers, auto_name).register(config_class, twin, exist_ok=True)
        _CONFIGS[stock_type] = config_class


def _stock_type(config: PretrainedConfig) -> str:
    return getattr(type(config), "stock_model_type", None) or config.model_type


def _stock_class(model_class: type) -> type:
    return model_class.__bases__[0] if model_class in _TWINS.values() else model_class


def pruned_config(config: PretrainedConfig, widths: Sequence[dict[str, int]]) -> PretrainedConfig:
    """A copy of ``config`` as its family's pruned config class, recording ``widths``."""
    register_pruned_architectures()
    root = _root_config(config)
    new = copy.deepcopy(root)
    new.__class__ = _CONFIGS[_stock_type(root)]
    new.pruned_layers = [dict(w) for w in widths]
    return new


def adopt_pruned_config(model: nn.Module, widths: Sequence[dict[str, int]]) -> None:
    """Point ``model`` and all its submodules at a pruned config recording ``widths``.

    Then ``model.save_pretrained`` writes a config that ``AutoModel*.from_pretrained`` rebuilds
    per layer (after ``import peft_gates``). Per-layer attention views keep their head counts.
    """
    old = _root_config(model.config)
    new = pruned_config(old, widths)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is old:
            module.config = new
        elif isinstance(config, LayerConfigView) and _root_config(config) is old:
            object.__setattr__(config, "_base", new)


# --------------------------------------------------------------------------------------------------
# Zero-padded stock layout
# --------------------------------------------------------------------------------------------------


def _stock_config(model: nn.Module, intermediate: int, units: int) -> PretrainedConfig | None:
    """Stock config with ``intermediate`` MLP width and ``units`` attention units, if the family accepts it.

    The head_dim must survive: families that derive it from ``hidden / heads`` (GPT-2, BERT) or
    validate ``hidden % heads == 0`` (Llama, Gemma) refuse some head counts.
    """
    spec, shape = model_spec(model)
    data = _root_config(model.config).to_dict()
    for key in ("pruned_layers", "model_type", "transformers_version"):
        data.pop(key, None)
    data[spec.intermediate_attr] = intermediate
    data[spec.heads_attr] = units * shape.heads_per_unit
    if spec.kv_heads_attr:
        data[spec.kv_heads_attr] = units
    if spec.head_dim_attr:
        data[spec.head_dim_attr] = shape.head_dim
    data["architectures"] = [_stock_class(type(model)).__name__]
    try:
        config = CONFIG_MAPPING[_model_stock_type(model)].from_dict(data)
    except (
        Exception
    ):  # validation errors differ by version (ValueError, huggingface_hub StrictDataclassError)
        return None
    got = attention_shape(spec, config)
    if (got.head_dim, got.heads_per_unit) != (shape.head_dim, shape.heads_per_unit):
        return None
    return config


def _model_stock_type(model: nn.Module) -> str:
    """The stock model_type of a (possibly pruned-config) model."""
    return _stock_type(_root_config(model.config))


def zero_pad_layout(model: nn.Module) -> tuple[dict[str, torch.Tensor], PretrainedConfig]:
    """State dict and stock config of ``model`` with every block zero-padded to the widest kept block.

    Heads are padded to the widest kept block's unit count when the family's config accepts that
    head count with the same head_dim, else to the smallest larger count it accepts (at worst the
    original). The model itself is not modified.
    """
    spec, shape = model_spec(model)
    widths = layer_widths(model)
    intermediate = max(w["intermediate_size"] for w in widths)
    config = None
    for units in range(max(w["num_key_value_heads"] for w in widths), shape.num_units + 1):
        config = _stock_config(model, intermediate, units)
        if config is not None:
            break
    if config is None:
        raise ValueError(
            f"no stock {_model_stock_type(model)} config accepts the padded widths (intermediate "
            f"{intermediate}); save with layout='per_layer'"
        )
    state = model.state_dict()
    blocks_name, blocks = find_blocks(model, spec)
    for i, (block, width) in enumerate(zip(blocks, widths, strict=True)):
        now = AttentionShape(width["num_attention_heads"], width["num_key_value_heads"], shape.head_dim)
        neurons = _padded(width["intermediate_size"], intermediate)
        kept_units = _padded(width["num_key_value_heads"], units)
        for name, (rows, columns) in block_indices(
            spec, now, width["intermediate_size"], neurons, kept_units
        ).items():
            padded = rebuild_linear(block.get_submodule(name), rows, columns)
            for pname, param in padded.named_parameters():
                state[f"{blocks_name}.{i}.{name}.{pname}"] = param.detach()
    return state, config


def _padded(kept: int, total: int) -> torch.Tensor:
    return torch.cat([torch.arange(kept), torch.full((total - kept,), -1, dtype=torch.long)])


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def _refuse_adapters(model: nn.Module) -> None:
    """A model that still carries PEFT adapters would be saved as an adapter, not as a pruned model."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

    wrapped = next((name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)), None)
    if isinstance(model, (PeftModel, BaseTuner)) or wrapped is not None:
        where = f" (adapter layer at {wrapped!r})" if wrapped else ""
        raise TypeError(
            f"save_pruned got a {type(model).__name__} that still carries adapters{where}; merge first and "
            "save the result: pruned = model.merge_and_unload() (or peft_gates.prune_and_unload(model)), "
            "then save_pruned(pruned, ...)"
        )


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Where a directory written to ``out_dir`` lands (a symlink's target), refused unless it is missing,
    an empty directory, or ``overwrite=True``; call it before expensive work to fail early."""
    out = Path(out_dir).expanduser()
    target = out.resolve() if out.is_symlink() else out
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"out_dir={str(out)!r} is a file, not a directory; pass a directory path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"out_dir={str(out)!r} exists and is not empty; pass overwrite=True to replace it"
        )
    return target


def write_directory(
    out_dir: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False
) -> Path:
    """Run ``write(tmp)`` on a fresh directory next to ``out_dir`` and rename it into place, all or nothing.

    ``out_dir`` must be missing or an empty directory unless ``overwrite=True``; a symlink is followed, so
    the export lands where it points (the link stays). A failure leaves neither a half-written
    directory nor temporary files behind, and restores what ``overwrite`` was about to replace.
    """
    out = Path(out_dir).expanduser()
    target = check_out_dir(out, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        write(tmp)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary file next to ``path`` and rename it over ``path``: a reader never
    sees a half-written file, and a failure leaves the old one (if any) as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_pruned(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    layout: Layout = "per_layer",
    overwrite: bool = False,
    report: PrunePlan | None = None,
    safe_serialization: bool = True,
) -> Path:
    """Save a pruned model so it reloads exactly, all or nothing.

    Everything is written into a temporary directory next to ``out_dir`` and renamed into place at
    the end (:func:`write_directory`), so a failure leaves neither a half-written export nor temporary
    files behind.

    Args:
        model: the result of ``prune_and_unload`` / ``merge_and_unload``. A family without an entry in
            the architecture table had its gates folded but nothing cut out: it is saved as the stock
            model it still is (both layouts).
        out_dir: target directory; must be missing or empty unless ``overwrite=True``.
        tokenizer: saved alongside when given. The generation config is saved when the model has one.
        layout: ``"per_layer"`` (reload via the Auto classes after ``import peft_gates``) or
            ``"zero_pad"`` (stock config, loads with plain transformers; see module docstring).
        overwrite: replace an existing non-empty ``out_dir``.
        report: the :class:`~peft_gates.pruning.PrunePlan` of the merge; writes
            ``compression_report.{json,md,png}`` into the export.
        safe_serialization: safetensors (transformers 5 writes nothing else).
    """
    if layout not in ("per_layer", "zero_pad"):
        raise ValueError(f"layout={layout!r} is invalid: use 'per_layer' or 'zero_pad'")
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(
            f"tokenizer={tokenizer!r} is not a tokenizer object; pass AutoTokenizer.from_pretrained(...) "
            "or None"
        )
    if report is not None and not isinstance(report, PrunePlan):
        raise TypeError(
            f"report={report!r} is not a PrunePlan; pass peft_gates.plan_pruning(model, ...) from before the "
            "merge, or None"
        )
    _refuse_adapters(model)
    save_kwargs: dict[str, Any] = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        save_kwargs["safe_serialization"] = safe_serialization
    elif not safe_serialization:
        raise ValueError(
            f"safe_serialization={safe_serialization} is not available: transformers "
            f"{transformers.__version__} only writes safetensors; pass safe_serialization=True"
        )

    def write(tmp: Path) -> None:
        if arch_spec(model.config.model_type) is None:
            model.save_pretrained(tmp, **save_kwargs)
        elif layout == "zero_pad":
            state, config = zero_pad_layout(model)
            model.save_pretrained(tmp, state_dict=state, **save_kwargs)
            config.save_pretrained(tmp)
        else:
            config = pruned_config(model.config, layer_widths(model))
            stock = _stock_class(type(model))
            config.architectures = [_TWINS[stock].__name__ if stock in _TWINS else stock.__name__]
            model.save_pretrained(tmp, **save_kwargs)
            config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            from .report import write_report

            write_report(report, tmp)

    return write_directory(out_dir, write, overwrite=overwrite)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``, replacing what is there; restore the old ``out`` if that fails."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.{uuid.uuid4().hex}.old"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old)
