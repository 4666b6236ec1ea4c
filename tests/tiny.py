"""Tiny randomly initialised models of every supported family (unit tests only; no hub access)."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 96

_COMMON = dict(
    vocab_size=VOCAB,
    num_hidden_layers=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=1,
)
_DECODER = dict(**_COMMON, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)

#: family -> (config class, kwargs). GQA (4 heads / 2 KV heads) wherever the family has it.
CONFIGS: dict[str, tuple[type, dict]] = {
    "llama": (tf.LlamaConfig, _DECODER),
    "mistral": (tf.MistralConfig, _DECODER),
    "qwen2": (tf.Qwen2Config, _DECODER),
    "qwen3": (tf.Qwen3Config, dict(_DECODER, head_dim=8)),
    "gemma2": (tf.Gemma2Config, dict(_DECODER, head_dim=8)),
    "gemma3_text": (tf.Gemma3TextConfig, dict(_DECODER, head_dim=8)),
    "phi3": (tf.Phi3Config, _DECODER),
    "gpt2": (
        tf.GPT2Config,
        dict(vocab_size=VOCAB, n_layer=2, n_embd=32, n_head=4, n_positions=64, pad_token_id=0),
    ),
    "bert": (tf.BertConfig, dict(_COMMON, hidden_size=32, intermediate_size=48, num_attention_heads=4)),
    "roberta": (
        tf.RobertaConfig,
        dict(_COMMON, hidden_size=32, intermediate_size=48, num_attention_heads=4),
    ),
}
ENCODERS = ("bert", "roberta")
FAMILIES = tuple(CONFIGS)


def tiny_config(family: str, **overrides):
    cls, kwargs = CONFIGS[family]
    return cls(**{**kwargs, **overrides})


def tiny_model(family: str, task: str = "causal", seed: int = 0, **overrides):
    """A tiny model in eval mode: a causal LM, or a classifier for encoders and ``task='seq_cls'``."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    if task == "seq_cls" or family in ENCODERS:
        config.num_labels = 2
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = 0
        return tf.AutoModelForSequenceClassification.from_config(config).eval()
    return tf.AutoModelForCausalLM.from_config(config).eval()


def tiny_inputs(batch: int = 2, seq: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, seq), generator=g)
