"""Tiny stand-ins for the ``--smoke`` runs of the examples (and the docs test): no downloads, seconds.

A word-level tokenizer with a ChatML template, 2-layer random models and made-up sentiment sentences
exercise every code path of an example (chat templates, prompt/completion masking, the merge, saving,
reloading); the numbers they produce mean nothing. The real runs use :mod:`peft_gates.assets`.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_GOOD = ("good", "great", "fine", "lovely", "moving", "smart")
_BAD = ("bad", "dull", "awful", "boring", "weak", "messy")
_FILL = ("the film", "this movie", "a story", "its cast", "the plot", "every scene")


def enter_smoke_mode(seed: int = 0) -> Path:
    """One CPU thread (a tiny model gains nothing from more, and they thrash on a shared machine), a fixed
    seed, and a fresh working directory, so every relative output path lands there: ``$PEFT_GATES_SMOKE_DIR``
    when set (the tests inspect the outputs there), else a new temporary directory."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    random.seed(seed)
    workdir = Path(os.environ.get("PEFT_GATES_SMOKE_DIR") or tempfile.mkdtemp(prefix="peft_gates_smoke_"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    return workdir


def tiny_tokenizer() -> Any:
    """A word-level fast tokenizer with a ChatML chat template, built in memory.

    Its vocabulary is the words of the sentiment prompt (:mod:`peft_gates.assets`) and of
    :func:`synthetic_sentiment`, so prompts stay a few dozen tokens long, like with a real tokenizer.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from peft_gates import assets

    text = " ".join(
        [assets.SYSTEM_PROMPT, assets.USER_TEMPLATE, *assets.ANSWER_WORDS, *_GOOD, *_BAD, *_FILL]
        + ["system", "user", "assistant", "is"]
    )
    words = sorted(set(re.findall(r"\w+|[^\w\s]+", text)))
    specials = ["[PAD]", "[UNK]", "[CLS]", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=1024,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_causal_lm(tokenizer: Any) -> Any:
    """A 2-layer random Llama (4 heads, 2 KV heads) sized to ``tokenizer``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def tiny_classifier(tokenizer: Any, num_labels: int = 2) -> Any:
    """A 2-layer random BERT sequence classifier sized to ``tokenizer``."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        num_labels=num_labels,
    )  # fmt: skip
    return AutoModelForSequenceClassification.from_config(config)


def synthetic_sentiment(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` made-up (sentence, label) pairs with a cue word; label 1 = positive."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        label = rng.randint(0, 1)
        pairs.append((f"{rng.choice(_FILL)} is {rng.choice(_GOOD if label else _BAD)}", label))
    return pairs


def save_tiny_causal_lm(path: str | os.PathLike) -> Path:
    """A tiny Llama and its tokenizer saved to ``path`` (for examples that load from a directory)."""
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def quickstart_setup() -> tuple[Any, Any, Any, int]:
    """What the load section of examples/quickstart.py defines: model, tokenizer, train_dataset, max_steps."""
    from datasets import Dataset

    from peft_gates import assets

    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer)
    train_dataset = Dataset.from_list(assets.build_sft_examples(tokenizer, synthetic_sentiment(32)))
    return model, tokenizer, train_dataset, 4
