"""Multi-process training on CPU: DDP x2 (gloo) and DeepSpeed ZeRO-2 / ZeRO-3 x2 against one process.

Each launch is a ``torchrun --nproc_per_node 2`` subprocess running a script from tests/dist_scripts
(DeepSpeed keeps global state, so one configuration per process). All runs train the same tiny gated
Llama on the same global batches of 4 with plain SGD; the per-step curves (loss, sparsity term,
realized sparsity) and the final gates must match the single-process reference computed here.

Gate noise: the equivalence runs use ``noise_std=0``. With noise on, the Trainer seeds every rank
with ``args.seed``, so all ranks draw the same noise vector per forward, one draw shared by the whole
(micro-)batch, as in one process; ``test_ddp`` checks that a noisy DDP run matches the noisy
single-process run too. (Hand-written loops that seed ranks differently draw different noise per
rank: still an unbiased estimate of the same objective, but not step-by-step comparable.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))

import gate_setups as g  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_thread")]

SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"
TOL = 2e-5
REPORT: dict[str, dict[str, float]] = {}  # max differences per setup, printed at the end (-s)


def launch(cmd: list[str], out: Path, timeout: int = 300) -> None:
    """Run a multi-process launcher in its own process group (killed as a whole on timeout)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    # no_shm/sitecustomize.py keeps DeepSpeed from JIT-compiling an op training never uses (~2 min).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPTS / "no_shm"), env.get("PYTHONPATH")]))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=g.REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} timed out after {timeout} s:\n{stderr[-6000:]}") from None
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}"
        )


def torchrun(script: str, out: Path, *args: str) -> dict:
    """``torchrun --standalone --nproc_per_node 2 script out args``; rank 0's JSON result."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    launch([*cmd, str(SCRIPTS / script), str(out), *args], out)
    return json.loads(out.read_text())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_REFS: dict[str, dict] = {}


def reference(tmp_path_factory, name: str = "plain", **gates_kw) -> dict:
    """Single-process reference (transformers.Trainer, batch 4, GA 1, no checkpointing).

    With a low-rank update (``lora_rank`` in ``gates_kw``) it trains like ``ds_train.py``'s ``lora`` flag:
    the grouped optimizer that ``attach`` sets up, at the lrs of ``g.LOW_RANK_LRS``.
    """
    from transformers import Trainer

    from peft_gates.training import attach

    if name not in _REFS:
        out = str(tmp_path_factory.mktemp(f"ref_{name}"))
        low_rank = bool(gates_kw.get("lora_rank"))
        trainer = Trainer(
            model=g.gated_model(**gates_kw),
            args=g.training_args(out, **(dict(learning_rate=g.LOW_RANK_LRS[0]) if low_rank else {})),
            train_dataset=g.RowsDataset(g.token_rows()),
        )
        attach(trainer, lora_lr=g.LOW_RANK_LRS[1] if low_rank else None)
        trainer.train()
        _REFS[name] = {"curves": g.curves(trainer), "gates": g.gate_vectors(trainer.model)}
    return _REFS[name]


def flat(gates: dict[str, list[float]]) -> np.ndarray:
    return np.concatenate([np.asarray(gates[k]) for k in sorted(gates)])


def compare(name: str, ref: dict, run: dict, tol: float = TOL, gates: bool = True) -> dict[str, float]:
    assert "error" not in run or run["error"] is None, run.get("error")
    assert sorted(ref["gates"]) == sorted(run["gates"])
    diffs = {
        key: float(np.abs(np.subtract(ref["curves"][key], run["curves"][key])).max())
        for key in ("loss", "sparsity_loss", "sparsity_realized")
    }
    if gates:
        diffs["gates"] = float(np.abs(flat(ref["gates"]) - flat(run["gates"])).max())
    REPORT[name] = diffs
    print(f"{name}: max differences to one process {diffs}")
    assert all(v <= tol for v in diffs.values()), (name, diffs)
    return diffs


def test_ddp(tmp_path_factory, tmp_path):
    setups = ["plain", "gc", "gc_reentrant", "noise", "unused_nonreentrant", "unused_reentrant"]
    result = torchrun("ddp_train.py", tmp_path / "ddp.json", *setups)
    ref = reference(tmp_path_factory)
    for name in ("plain", "gc", "gc_reentrant"):
        assert result[name]["world_size"] == 2 and result[name]["wrapper"] == "DistributedDataParallel"
        compare(f"ddp_{name}", ref, result[name])
    noisy = reference(tmp_path_factory, "noise", noise_std=0.1)
    assert np.abs(flat(noisy["gates"]) - flat(ref["gates"])).max() > 100 * TOL  # the noise does act
    compare("ddp_noise", noisy, result["noise"])
    # find_unused_parameters=True with checkpointing: attach() refuses reentrant (DDP really fails) and
    # warns for non-reentrant (which DDP accepts).
    bad = result["unused_reentrant"]
    assert "ddp_find_unused_parameters=False" in bad["check"]["refused"]
    assert "mark a variable ready only once" in bad["error"]
    ok = result["unused_nonreentrant"]
    assert ok["check"]["refused"] is None and ok["error"] is None
    assert any("ddp_find_unused_parameters=False" in w for w in ok["check"]["warnings"])


def test_zero2_gradient_accumulation_and_checkpointing(tmp_path_factory, tmp_path):
    """ZeRO-2 x2, per-device batch 1 x GA 2, non-reentrant checkpointing."""
    result = torchrun("ds_train.py", tmp_path / "z2.json", "2", "ga2", "gc")
    assert (result.get("zero_stage"), result.get("world_size")) == (2, 2), result.get("error")
    assert result["loss_scale"] == 1.0
    compare("zero2_ga2_gc", reference(tmp_path_factory), result)


def test_zero3_partitioned_gates_reentrant(tmp_path_factory, tmp_path):
    """ZeRO-3 x2 with every gate vector partitioned, reentrant checkpointing (what TRL forces for PEFT),
    base loaded by from_pretrained under zero.Init."""
    g.tiny_llama().save_pretrained(tmp_path / "base")
    result = torchrun(
        "ds_train.py", tmp_path / "z3.json", "3", "gc_reentrant", f"pretrained={tmp_path / 'base'}"
    )
    assert (result.get("zero_stage"), result.get("world_size")) == (3, 2), result.get("error")
    assert result["zero_init_base"] and result["partitioned_gate_vectors"] == len(result["gates"])
    compare("zero3_gc_reentrant", reference(tmp_path_factory), result)


def test_zero3_low_rank_update(tmp_path_factory, tmp_path):
    """ZeRO-3 x2 with the low-rank update inside the gates (``lora_rank``): its A and B are partitioned
    like the gates, train at their own lr in the grouped optimizer that ``attach`` has the trainer build
    (DeepSpeed drops a preset one), and end where one process ends."""
    g.tiny_llama().save_pretrained(tmp_path / "base")
    result = torchrun("ds_train.py", tmp_path / "z3l.json", "3", "lora", f"pretrained={tmp_path / 'base'}")
    assert (result.get("zero_stage"), result.get("world_size")) == (3, 2), result.get("error")
    assert result["partitioned_gate_vectors"] == len(result["gates"])  # gates and A, B
    updates = [name for name in result["gates"] if "peft_gates_lora_B" in name]
    assert updates and all(any(v != 0 for v in result["gates"][name]) for name in updates)  # B trained
    compare("zero3_low_rank", reference(tmp_path_factory, "low_rank", lora_rank=4), result)


def test_zero3_global_scope(tmp_path_factory, tmp_path):
    """ZeRO-3 x2, unit gates under one budget shared by all layers (``sparsity_scope="global"``), gates
    partitioned, reentrant checkpointing: every rank reads the same total open mass (each layer records
    it from its gathered gates in the forward), so the run ends where one process ends."""
    g.tiny_llama().save_pretrained(tmp_path / "base")
    result = torchrun(
        "ds_train.py", tmp_path / "z3g.json", "3", "global", "gc_reentrant", f"pretrained={tmp_path / 'base'}"
    )
    assert (result.get("zero_stage"), result.get("world_size")) == (3, 2), result.get("error")
    assert result["partitioned_gate_vectors"] == len(result["gates"])
    compare("zero3_global_scope", reference(tmp_path_factory, "global", **g.GLOBAL_SCOPE), result)


def test_sft_script_zero3_bf16(tmp_path):
    """integrations/trl/sft_gates.py under ``accelerate launch`` with integrations/accelerate/zero3.yaml
    (2 processes, bf16, base partitioned by zero.Init at load, TRL's PEFT + ZeRO-3 path, adapter saved
    by ZeRO-3 gathering, then pruned on the main process) against the same script in one fp32 process.

    bf16 rounding flips a few gates at clamp boundaries, so the comparison is on the curves; a wrong
    sparsity-gradient scale (x2 for the world size or GA) moves the sparsity curve by > 1e-2.
    """
    script = g.load_integration("trl/sft_gates.py")
    base_dir, data_dir = g.write_sft_inputs(tmp_path)
    ref = script.main(g.sft_argv(base_dir, data_dir, tmp_path / "ref"))
    ref_log = [
        h
        for h in json.loads((tmp_path / "ref" / "trainer_state.json").read_text())["log_history"]
        if "loss" in h
    ]

    out = tmp_path / "z3"
    argv = g.sft_argv(
        base_dir, data_dir, out, per_device_train_batch_size=2, bf16=True,
        accelerator_config='{"use_configured_state": true}',
    )  # fmt: skip
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(g.INTEGRATIONS / "accelerate" / "zero3.yaml"), "--num_processes", "2",
        "--main_process_port", str(free_port()), str(g.INTEGRATIONS / "trl" / "sft_gates.py"), *argv,
    ]  # fmt: skip
    launch(cmd, out / "pruned" / "config.json", timeout=400)
    log = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert [h["num_tokens"] for h in log] == [h["num_tokens"] for h in ref_log]  # 2 ranks x 2 rows per step
    diffs = {
        key: float(np.abs(np.subtract([h[key] for h in ref_log], [h[key] for h in log])).max())
        for key in ("loss", "sparsity_loss", "sparsity_realized")
    }
    REPORT["sft_zero3_bf16"] = diffs
    print(f"sft_zero3_bf16: max differences to one fp32 process {diffs}")
    assert diffs["sparsity_loss"] < 2e-3 and diffs["loss"] < 2e-3 and diffs["sparsity_realized"] < 1e-2, diffs
    assert ref["final_log"]["params_removable"] > 0 and log[-1]["params_removable"] > 0
    # the ZeRO-3 run's own export: gathered from the shards, cut smaller than the base, and it reloads
    from transformers import AutoModelForCausalLM

    import peft_gates  # noqa: F401  (registers the pruned architectures)

    def size(path: Path) -> int:
        return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())

    assert (out / "adapter_config.json").is_file()
    assert size(out / "pruned") < size(base_dir)
