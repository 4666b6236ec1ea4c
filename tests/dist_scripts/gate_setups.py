"""One tiny Llama, one data set, one recipe: shared by tests/test_training.py and the distributed scripts.

Every setup (single process, DDP x2, ZeRO-2/3 x2, gradient accumulation, checkpointing) trains the same
model on the same global batches, so the per-step curves must agree. Sequences all have the same
length and no padding, so the token-mean loss of a global batch does not depend on how it is split
over ranks or micro-batches.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
INTEGRATIONS = REPO / "integrations"
SEQ_LEN = 12
NUM_EXAMPLES = 32
VOCAB = 64


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def token_rows(n: int = NUM_EXAMPLES, seq_len: int = SEQ_LEN, seed: int = 1) -> list[list[int]]:
    """Learnable token rows: arithmetic progressions mod VOCAB with a random start and step."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, VOCAB, (1,), generator=gen))
        step = int(torch.randint(1, 4, (1,), generator=gen))
        rows.append([(start + i * step) % VOCAB for i in range(seq_len)])
    return rows


class RowsDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[list[int]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(self.rows[i])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


#: (gates' lr, update's lr) of the runs with a low-rank update (plain SGD, like every equivalence run)
LOW_RANK_LRS = (50.0, 0.5)
#: unit gates under one parameter budget shared by every layer (GateConfig.sparsity_scope="global")
GLOBAL_SCOPE = {"placement": "units", "sparsity_scope": "global"}


def gate_config(**overrides: Any):
    from peft_gates import GateConfig

    kwargs: dict[str, Any] = dict(
        target_modules="all-linear",
        placement="both",
        target_sparsity=0.5,
        sparsity_weight=5.0,
        noise_std=0.0,
        init_mean=0.6,
        init_std=0.3,
    )
    kwargs.update(overrides)
    return GateConfig(**kwargs)


def gated_model(seed: int = 0, **gate_overrides: Any):
    from peft import get_peft_model

    model = tiny_llama(seed)
    torch.manual_seed(seed + 100)  # gate init draws
    return get_peft_model(model, gate_config(**gate_overrides))


def injected_sparsity_gradient(model, ga: int = 1, loss_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The sparsity gradient one training backward injects, per trainable parameter: the gradient with
    lambda on minus the gradient with lambda off on the first row (with noise off both forwards agree).
    The loss is scaled and divided as the Trainer does for a loss scale and ``ga`` accumulation steps."""
    from peft_gates.training import gate_model_of, set_sparsity_step

    batch = {k: v[None] for k, v in RowsDataset(token_rows())[0].items()}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def grads(with_term: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        set_sparsity_step(model, 0, gradient_accumulation_steps=ga, loss_scale=loss_scale)
        if not with_term:
            gate_model_of(model).sparsity_coefficients["default"].weight = 0.0
        (model(**batch).loss * loss_scale / ga).backward()
        return {n: p.grad.clone() for n, p in params.items()}

    with_term, without = grads(True), grads(False)
    return {n: with_term[n] - without[n] for n in params}


def training_args(out_dir: str, **overrides: Any):
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = dict(
        output_dir=out_dir,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=8,
        # Plain SGD: an update is proportional to the gradient, so a wrongly scaled sparsity gradient
        # (GA, world size, loss scale) shows up in the curves; Adam would normalize much of it away.
        learning_rate=50.0,
        lr_scheduler_type="constant",
        optim="sgd",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=False,
        dataloader_num_workers=0,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        bf16=False,
        fp16=False,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def gate_vectors(peft_model) -> dict[str, list[float]]:
    """Full gate vectors by parameter name (gathers ZeRO-3 partitions; collective under ZeRO-3)."""
    from peft_gates.stats import gathered

    params = {n: p for n, p in peft_model.named_parameters() if "peft_gates_" in n}
    with gathered(list(params.values())):
        return {
            n.replace("base_model.model.", ""): p.detach().float().flatten().tolist()
            for n, p in params.items()
        }


def curves(trainer) -> dict[str, list[float]]:
    """Per-step training curves from log_history (what every reporter saw)."""
    keys = (
        "loss",
        "sparsity_loss",
        "sparsity_realized",
        "sparsity_lambda",
        "gates_fractional",
        "params_removable",
    )
    rows = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    return {k: [float(h[k]) for h in rows] for k in keys if all(k in h for h in rows)}


def run(out_dir: str, model=None, **args_overrides: Any) -> dict[str, Any]:
    """Train the tiny gated model with transformers.Trainer + attach; return curves and final gates."""
    from transformers import Trainer

    from peft_gates.training import attach

    resume = args_overrides.pop("resume", None)
    model = model if model is not None else gated_model()
    args = training_args(out_dir, **args_overrides)
    trainer = Trainer(model=model, args=args, train_dataset=RowsDataset(token_rows()))
    attach(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return {"curves": curves(trainer), "gates": gate_vectors(trainer.model), "trainer": trainer}


def dump(result: dict[str, Any], path: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        Path(path).write_text(json.dumps({k: v for k, v in result.items() if k != "trainer"}))


def setup_deepspeed_on_cpu() -> None:
    """accelerate 1.15 sees one process under torchrun+DeepSpeed on CPU unless the state is pre-built."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    import importlib

    from accelerate import PartialState

    # DeepSpeed JIT-compiles a shared-memory all-reduce op (about 2 minutes on a fresh machine) that only
    # its inference all-reduce uses; training collectives go through torch.distributed (gloo).
    # (`deepspeed.comm.torch` as an attribute is the torch package, hence importlib.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    PartialState(backend="gloo")


def shutdown_distributed() -> None:
    """Destroy the process group and end the process without interpreter teardown.

    A gloo or DeepSpeed thread still alive at teardown aborts the rank ("terminate called without an active
    exception", seen in CI even after destroy_process_group), failing a run whose result is already
    written. Every script calls this last, after writing its JSON, so skipping teardown loses nothing.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":  # pragma: no cover - manual smoke run
    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gate_setups")["curves"], indent=1))


def tiny_tokenizer():
    """A word-level tokenizer over VOCAB words ``w0 .. w60`` plus pad/eos/unk (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def text_rows(n: int = NUM_EXAMPLES) -> list[dict[str, str]]:
    """The token rows of :func:`token_rows` as text for SFTTrainer (words w0..w60)."""
    return [{"text": " ".join(f"w{t % (VOCAB - 3)}" for t in row)} for row in token_rows(n)]


def load_integration(relative: str):
    """Import a script from integrations/ as a module (registered, so dataclasses resolve annotations)."""
    import importlib.util

    path = INTEGRATIONS / relative
    if path.stem in sys.modules:
        return sys.modules[path.stem]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def write_sft_inputs(root: Path) -> tuple[Path, Path]:
    """A local model dir (tiny Llama + tokenizer) and a local jsonl data dir for integrations/trl."""
    base_dir, data_dir = Path(root) / "base", Path(root) / "data"
    tiny_llama().save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in text_rows()))
    return base_dir, data_dir


def sft_argv(base_dir: Path, data_dir: Path, out_dir: Path, **overrides: Any) -> list[str]:
    """Command line of integrations/trl/sft_gates.py for the tiny set-up (SGD, no gate noise, 6 steps)."""
    options: dict[str, Any] = {
        "model_name_or_path": base_dir, "dataset_name": data_dir, "output_dir": out_dir, "max_steps": 6,
        "per_device_train_batch_size": 4, "learning_rate": 50, "optim": "sgd",
        "lr_scheduler_type": "constant", "logging_steps": 1, "report_to": "none", "use_cpu": True,
        "bf16": False, "save_strategy": "no", "dtype": "float32", "sparsity_weight": 5,
        "target_sparsity": 0.5, "init_mean": 0.6, "init_std": 0.3, "noise_std": 0, "prune_multiple_of": 1,
        "seed": 0,
    }  # fmt: skip
    options.update(overrides)
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]
