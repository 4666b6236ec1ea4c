"""Gates on quantized bases: dequantizing for the merge, and preparing a 4/8-bit base for training.

Training needs nothing special: a gate layer only *calls* its base layer (``y = base(x * z_c) * z_r``), so
bitsandbytes ``Linear4bit`` (nf4/fp4, double quant, any ``quant_storage``) and ``Linear8bitLt`` work through
``get_peft_model`` unchanged. Two things do need care, and live here:

* **The merge** folds gates into weights and cuts closed units, so it needs the base weight as a float
  matrix. :func:`dequantize_weight` returns exactly the fp32 matrix the quantized forward multiplies by (for
  4-bit this is bitwise the matrix ``bnb.matmul_4bit`` dequantizes to; for 8-bit the one of the training-mode
  matmul), or raises :class:`UnsupportedQuantizationError` for backends we cannot dequantize faithfully. An
  in-place merge of a quantized layer is refused (4-bit codes cannot absorb fractional column gates without a
  new rounding, and cutting units changes shapes); the merge builds a new dense model instead.
* **The CPU repacking trap** (bitsandbytes 0.50.2, CPUs with AVX512-BF16): the first forward of a
  ``Linear4bit`` in eval mode with an input that does not require grad repacks its weight, in place and for
  good, into an inference layout whose matmul has no autograd and rounds absmax and activations to bf16.
  Later training then silently gets no gradient through that layer. :func:`prepare_quantized_for_gates`
  switches the repacking off for every 4-bit layer (and undoes it where it already happened).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_QUANTIZATION",
    "UnsupportedQuantizationError",
    "dequantize_weight",
    "disable_cpu_repacking",
    "is_quantized_linear",
    "mark_dequantized",
    "prepare_quantized_for_gates",
    "quantization_backend",
    "requantize",
]

SUPPORTED_QUANTIZATION = (
    "bitsandbytes 4-bit (Linear4bit: nf4 or fp4, with or without double quant, any bnb_4bit_quant_storage) "
    "and bitsandbytes 8-bit (Linear8bitLt)"
)

# Module-path prefixes of quantization libraries whose layers we recognise but cannot dequantize.
_KNOWN_BACKENDS = (
    ("auto_gptq", "GPTQ (auto-gptq)"),
    ("gptqmodel", "GPTQ (gptqmodel)"),
    ("optimum.gptq", "GPTQ (optimum)"),
    ("awq", "AWQ (autoawq)"),
    ("hqq", "HQQ"),
    ("torchao", "torchao"),
    ("aqlm", "AQLM"),
    ("eetq", "EETQ"),
    ("optimum.quanto", "quanto"),
    ("compressed_tensors", "compressed-tensors"),
    ("fbgemm_gpu", "FBGEMM fp8"),
)


class UnsupportedQuantizationError(TypeError):
    """A quantized layer whose weight peft_gates cannot turn back into the float matrix its forward uses."""


def _unwrap(module: nn.Module) -> nn.Module:
    """The base layer under a PEFT tuner layer (gate, LoRA, ...); the module itself otherwise."""
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def _bnb_kind(module: nn.Module) -> str | None:
    """``"4bit"`` / ``"8bit"`` for bitsandbytes layers, from the weight's class name.

    Class names rather than ``isinstance`` so that importing this module never imports bitsandbytes (whose
    import is slow and prints warnings on machines without it); this is also how PEFT detects them.
    """
    name = type(getattr(module, "weight", None)).__name__
    if name == "Params4bit" or type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4"):
        return "4bit"
    if name == "Int8Params" or type(module).__name__ == "Linear8bitLt":
        return "8bit"
    return None


def quantization_backend(module: nn.Module) -> str | None:
    """Name of the quantization scheme of a Linear-like layer, or ``None`` for a plain float layer.

    ``"bitsandbytes-4bit"`` and ``"bitsandbytes-8bit"`` are supported by :func:`dequantize_weight`; any other
    non-``None`` answer (``"GPTQ (auto-gptq)"``, ``"HQQ"``, ``"fp8 (torch.float8_e4m3fn)"``, ``"unknown
    (QuantLinear)"`` ...) is a layer we recognise as quantized but cannot dequantize.
    """
    module = _unwrap(module)
    kind = _bnb_kind(module)
    if kind is not None:
        return f"bitsandbytes-{kind}"
    for obj in (module, getattr(module, "weight", None)):
        path = type(obj).__module__ or ""
        for prefix, label in _KNOWN_BACKENDS:
            if path == prefix or path.startswith(prefix + "."):
                return label
    if hasattr(module, "W_q"):  # HQQ layers outside the hqq package path (e.g. vendored)
        return "HQQ"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        if weight.dtype.is_floating_point and weight.dtype.itemsize == 1:  # float8: scales live elsewhere
            return f"fp8 ({weight.dtype})"
        if weight.dtype.is_floating_point and type(weight) in (torch.Tensor, nn.Parameter):
            return None
        return f"unknown ({type(module).__name__}, weight {type(weight).__name__} {weight.dtype})"
    if any(isinstance(getattr(module, a, None), torch.Tensor) for a in ("qweight", "qzeros", "codes", "W_q")):
        return f"unknown ({type(module).__name__}, packed qweight)"
    return None  # no weight at all: a container or an activation, not a Linear


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether a Linear-like layer (or the base under a PEFT tuner layer) holds a quantized weight.

    True for every quantized backend, including ones :func:`dequantize_weight` refuses: the merge asks this
    to decide whether to dequantize, and an unsupported backend must then fail loudly rather than be folded
    as if its packed integer codes were weights.
    """
    return quantization_backend(module) is not None


def _unsupported(module: nn.Module, backend: str, why: str = "") -> UnsupportedQuantizationError:
    return UnsupportedQuantizationError(
        f"cannot dequantize {type(module).__name__} (quantization: {backend}){': ' + why if why else ''}. "
        f"peft_gates can merge/prune only float Linear/Conv1D layers and {SUPPORTED_QUANTIZATION}. Load the "
        "base model with BitsAndBytesConfig or in bf16/fp16/fp32 for the merge (the trained adapter loads "
        "onto either, since gates do not depend on how the base weight is stored)."
    )


def _unpack_cpu_4bit(module: nn.Module):
    """Standard-layout 4-bit codes and a plain QuantState for a weight repacked by bitsandbytes' CPU path.

    The repacked layout ``[N, K/2]`` interleaves nibbles in 32-row blocks and keeps absmax as a bf16
    ``[K/blocksize, N]`` matrix (double quant already resolved). Undoing the nibble shuffle is lossless, and
    the bf16 absmax is what the packed matmul multiplies by, so dequantizing the result gives that forward's
    weight.
    We do not use ``bitsandbytes.functional._convert_weight_packed_for_cpu_inverse``: in 0.50.2 it leaves the
    absmax of a layer without double quant in the transposed packed order (wrong weights, about 24% relative
    error, no exception), and with double quant it re-quantizes the absmax (one more rounding).
    """
    from bitsandbytes.functional import QuantState

    block_n = 32
    state = module.weight.quant_state
    packed = module.weight.data.view(torch.uint8)
    n, k = module.out_features, module.in_features
    if tuple(packed.shape) != (n, k // 2) or n % block_n or k % state.blocksize:
        raise _unsupported(
            module, "bitsandbytes-4bit (CPU-repacked)", f"unexpected packed shape {packed.shape}"
        )
    # Inverse of bitsandbytes.functional._convert_weight_packed_for_cpu, step 1 (pure bit shuffling).
    rows = packed.reshape(-1, block_n)
    codes = torch.cat([rows & 0xF, (rows >> 4) & 0xF], dim=-1)
    codes = codes.reshape(n // block_n, k // 2, block_n, 2).transpose(1, 2).reshape(-1)
    flat = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8)  # standard layout: high nibble first
    plain = QuantState(
        absmax=state.absmax.T.reshape(-1).float().contiguous(),
        shape=torch.Size((n, k)),
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=getattr(state, "original_dtype", torch.float32),
    )
    return flat.reshape(-1, 1), plain


def _dequantize_packed_4bit(module: nn.Module) -> torch.Tensor:
    """fp32 weight of a CPU-repacked 4-bit layer (see :func:`_unpack_cpu_4bit`), leaving the layer as is."""
    from bitsandbytes.functional import dequantize_4bit

    flat, plain = _unpack_cpu_4bit(module)  # dtype: the layer's, like the unpacked path below
    return dequantize_4bit(flat, plain).to(torch.float32)


def _check_materialized(module: nn.Module, weight: torch.Tensor) -> None:
    if weight.device.type == "meta":
        raise ValueError(
            f"{type(module).__name__} has its weight on the meta device: load real weights first"
        )
    if weight.numel() == 0 or hasattr(weight, "ds_shape"):
        raise ValueError(
            f"{type(module).__name__} has a partitioned (DeepSpeed ZeRO-3) weight: merge offline in a plain "
            "process from the saved adapter, or gather it with deepspeed.zero.GatheredParameters first"
        )


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The fp32 ``(out_features, in_features)`` weight that a Linear-like layer's forward multiplies by.

    Accepts ``nn.Linear`` (any float dtype), GPT-2 ``Conv1D`` (transposed to ``(out, in)``), bitsandbytes
    ``Linear4bit`` and ``Linear8bitLt``, or a PEFT tuner layer wrapping one of them. Always returns a new
    tensor on the layer's device (never a view of the parameter), so callers may scale it in place. Raises
    :class:`UnsupportedQuantizationError` for any other quantized layer rather than guess: folding gates into
    a mis-decoded weight would give a model that loads and runs but is silently wrong.

    Exactness: 4-bit goes through ``bitsandbytes.functional.dequantize_4bit`` with the layer's own quant
    state, i.e. the same matrix ``matmul_4bit`` builds in its forward (cast to the compute dtype there);
    8-bit is ``CB * SCB / 127``, the matrix of the training-mode matmul (the eval-mode int8 matmul also
    quantizes the activations, which no weight can reproduce).
    """
    module = _unwrap(module)
    backend = quantization_backend(module)
    weight = getattr(module, "weight", None)
    if backend is None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{type(module).__name__} has no weight to dequantize")
        _check_materialized(module, weight)
        w = weight.detach().to(torch.float32, copy=True)
        return w.T.contiguous() if isinstance(module, Conv1D) else w

    out_features, in_features = module.out_features, module.in_features
    if backend == "bitsandbytes-4bit":
        _check_materialized(module, weight)
        if not getattr(weight, "bnb_quantized", True) and weight.dtype.is_floating_point:
            # a Linear4bit that was never moved to a device is not quantized yet: its weight is still float
            w = weight.detach().to(torch.float32, copy=True)
        else:
            state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
            if state is None:
                raise _unsupported(module, backend, "its quant_state is missing (was the weight re-wrapped?)")
            if getattr(state, "packing_format_for_cpu", False):
                w = _dequantize_packed_4bit(module)
            else:
                from bitsandbytes.functional import dequantize_4bit

                w = dequantize_4bit(weight.data, state).to(torch.float32)
    elif backend == "bitsandbytes-8bit":
        _check_materialized(module, weight)
        state = getattr(module, "state", None)
        if weight.dtype.is_floating_point:  # has_fp16_weights=True, or not quantized yet
            w = weight.detach().to(torch.float32, copy=True)
        else:
            scb = getattr(weight, "SCB", None)
            if scb is None and state is not None:
                scb = state.SCB
            if scb is None:
                raise _unsupported(module, backend, "its int8 row scales (SCB) are missing")
            # CB * (SCB * (1/127)), the expression of bitsandbytes' MatMul8bitFp (its training-mode matmul),
            # so the result is bitwise the matrix that forward multiplies by in fp32.
            scale = scb.to(weight.device, torch.float32).unsqueeze(1).mul(1.0 / 127.0)
            w = weight.data.to(torch.float32).mul_(scale)
    else:
        raise _unsupported(module, backend)
    if tuple(w.shape) != (out_features, in_features):
        raise _unsupported(
            module, backend, f"dequantized to {tuple(w.shape)}, expected {(out_features, in_features)}"
        )
    return w


def disable_cpu_repacking(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; undo repacking already done.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode (input not requiring grad) rewrites its
    weight into an inference-only layout whose matmul has no backward, and keeps it so. A model evaluated
    once before or during training would afterwards pass no gradient through those layers, including
    ungated 4-bit layers between gated ones, so gates upstream would train on wrong or zero gradients with
    no error. Setting ``support_avx512bf16_for_cpu = False`` (the flag bitsandbytes checks) keeps every
    forward on the differentiable dequantize-and-matmul path, which is also the one :func:`dequantize_weight`
    reproduces. Cost: 4-bit eval on such CPUs runs at training-path speed; GPUs are unaffected.

    Returns the number of layers whose weight had already been repacked and was converted back. The 4-bit
    codes come back exactly; the block scales stay the bf16 values the repacking rounded them to (about 1.5e-3
    relative weight change vs the loaded model), stored unnested in fp32 (+0.4 bit per weight for double-quant
    layers), so the restored layer computes with exactly the weights it had while packed.
    """
    restored = 0
    for module in model.modules():
        if _bnb_kind(module) != "4bit" or not isinstance(module, nn.Linear):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            flat, plain = _unpack_cpu_4bit(module)
            storage = getattr(state, "original_storage_type", None)
            data = flat.reshape(getattr(state, "original_qshape", (-1, 1)))  # uint8 view of the storage
            weight.data = data.view(storage) if storage is not None else data
            weight.quant_state = module.quant_state = plain
            restored += 1
    if restored:
        logger.warning(
            "%d bitsandbytes 4-bit layers had been repacked for CPU inference by an earlier eval forward; "
            "converted back to the trainable layout (block scales stay rounded to bf16). Call "
            "peft_gates.quantization.prepare_quantized_for_gates() right after loading to avoid this.",
            restored,
        )
    return restored


def prepare_quantized_for_gates(model: nn.Module) -> nn.Module:
    """Make a bitsandbytes 4/8-bit model (base or PeftModel) safe to train gates on, CPU or GPU.

    Call it right after ``from_pretrained(..., quantization_config=...)``, before any forward; calling it
    again on the PeftModel is harmless. It does only what gates need:

    * :func:`disable_cpu_repacking`: the AVX512-BF16 CPU trap (an eval forward would silently cut the
      gradient through 4-bit layers for the rest of the run); a no-op on GPUs and other CPUs.

    Deliberately *not* done, unlike ``peft.prepare_model_for_kbit_training`` (which also works, but is not
    needed): upcasting every non-4-bit parameter (embeddings, ``lm_head``, norms) to fp32, which costs about
    2 GB for a 128k-vocabulary 4096-wide model and does not affect gate training; and enabling input
    gradients for checkpointing, which transformers' ``gradient_checkpointing_enable`` (and TRL) already do
    for causal LMs. Freezing the base is done by ``get_peft_model``.
    """
    disable_cpu_repacking(model)
    return model


def mark_dequantized(model: nn.Module) -> nn.Module:
    """Drop transformers' quantizer bookkeeping from a model whose layers are all dense again (the merge's).

    ``prune_and_unload`` on a 4/8-bit base returns dense ``nn.Linear`` layers, but the model object still
    carries ``hf_quantizer``, ``is_loaded_in_4bit`` and ``config.quantization_config``. Left there,
    ``save_pretrained`` writes the ``quantization_config`` into ``config.json`` and a plain
    ``from_pretrained`` silently re-quantizes the merged weights on load (a second rounding the user did not
    ask for), and ``Trainer`` treats the model as quantized. Re-quantizing on purpose is :func:`requantize`.
    Raises if a quantized Linear is still present, since then the bookkeeping is still true.
    """
    left = [name for name, module in model.named_modules() if is_quantized_linear(module)]
    if left:
        raise ValueError(
            f"{len(left)} layers are still quantized (first: {left[0]!r}); merge/dequantize them before "
            "dropping the quantization config"
        )
    for attr in ("quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if attr in model.__dict__:
            delattr(model, attr)
    model.hf_quantizer = None  # transformers reads it with getattr(model, "hf_quantizer", None)
    model.is_quantized = False
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
    return model


def requantize(
    model: nn.Module,
    quantization_config,
    save_directory: str | None = None,
    device_map: str | dict | None = "cpu",
    overwrite: bool = False,
) -> nn.Module:
    """Re-quantize a merged (pruned, dense) model with ``quantization_config`` for deployment in 4/8 bit.

    Round-trips through disk and ``from_pretrained(quantization_config=...)``, the one path that writes
    ``quantization_config`` into ``config.json``, so the model saved to ``save_directory`` (if given) reloads
    quantized with a plain ``from_pretrained``. Pruned models with per-layer widths go through
    ``peft_gates.export.save_pruned`` and reload with their registered per-layer class: a stock class would
    build the unpruned shapes. Every Linear's shape is checked against ``model`` afterwards.

    This is a second rounding on top of the base model's quantization wherever the merge changed a
    quantization block: columns scaled by fractional gates get a fresh rounding (about as large as the
    original, ~8% for nf4), while layers left unchanged or only cut by whole rows re-quantize exactly (or
    within ~2e-3 with double quant, whose absmax is re-rounded); see ``integrations/quantized/README.md``.
    ``model`` loses its quantizer bookkeeping (:func:`mark_dequantized`). ``save_directory`` must be missing
    or empty unless ``overwrite=True``, and is written all or nothing (``peft_gates.export.write_directory``).
    """
    import tempfile
    from pathlib import Path

    from .export import check_out_dir, write_directory

    if save_directory is not None:
        check_out_dir(save_directory, overwrite)
    mark_dequantized(model)
    with tempfile.TemporaryDirectory(prefix="peft_gates_requant_") as tmp:
        path = Path(tmp) / "dense"
        cls = type(model)
        if getattr(model.config, "pruned_layers", None) is not None or hasattr(
            model.config, "stock_model_type"
        ):
            from .export import _TWINS, _stock_class, save_pruned

            save_pruned(model, path)
            cls = _TWINS.get(_stock_class(cls), cls)
        else:
            model.save_pretrained(path)
        quantized = cls.from_pretrained(path, quantization_config=quantization_config, device_map=device_map)
    disable_cpu_repacking(quantized)
    dense_shapes = {
        name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    for name, module in quantized.named_modules():
        if isinstance(module, nn.Linear) and name in dense_shapes:
            shape = tuple(dequantize_weight(module).shape) if is_quantized_linear(module) else None
            if (module.out_features, module.in_features) != dense_shapes[name] or (
                shape is not None and shape != dense_shapes[name]
            ):
                raise RuntimeError(f"re-quantized {name!r} has shape {shape}, expected {dense_shapes[name]}")
    if save_directory is not None:
        write_directory(save_directory, quantized.save_pretrained, overwrite=overwrite)
    return quantized
