"""SFT under torchrun on CPU (gloo): 2 ranks with DDP and with FSDP2 train exactly what one
process with gradient accumulation over the same global batch trains (under FSDP with
only rank 0 reading the student's weights); the saved adapter loads and merges; kill -9
of one rank, then a rerun resumes from the last checkpoint and ends on the same losses;
checkpoints keep each rank's own RNG state and, under FSDP, gather only the adapter; bad
settings (QLoRA under FSDP among them) are one error line.

The student is a tiny Llama built from a config (2 layers of width 16, the embedded
tokenizer), so each torchrun launch costs its start-up (~15 s here), not training.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from datagen.errors import ConfigError
from datagen.finetune.checkpoints import fingerprint
from datagen.finetune.config import FinetuneConfig
from datagen.finetune.distributed import rank_share, torchrun_command
from datagen.finetune.sft import train
from tests.helpers import run_cli, single_error_line
from tests.test_finetune import arithmetic_rows, tiny_model, write_jsonl

# dropout 0: the ranks draw other dropout masks than one process would
SETTINGS = dict(dropout=0.0, batch_size=4, learning_rate=1e-2, max_steps=4, warmup_ratio=0.0, merge=False)


def log_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def config_file(path, **settings) -> str:
    path.write_text("finetune:\n" + "".join(f"  {key}: {json.dumps(value)}\n" for key, value in settings.items()))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, embedded_model_path):
    """The tiny student, 32 examples, and one process's run with accumulation 2 (the reference)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("dist")
    tiny_model(folder / "tiny", AutoTokenizer.from_pretrained(embedded_model_path))
    data = write_jsonl(folder / "train.jsonl", arithmetic_rows(32))
    reference = folder / "one"
    train(FinetuneConfig(base=str(folder / "tiny"), grad_accum=2, **SETTINGS), data, reference, show_progress=False)
    return folder, data, log_of(reference)


def launch(setup, out, *extra, env: dict[str, str] | None = None, **settings) -> subprocess.CompletedProcess:
    folder, data, _reference = setup
    config = config_file(out.parent / f"{out.name}.yaml", base=str(folder / "tiny"), **{**SETTINGS, **settings})
    return run_cli("finetune", str(data), "--out", str(out), "--config", config, "--nproc", "2", *extra,
                   env={"DATAGEN_PROGRESS_INTERVAL": "0", **(env or {})})


# Put on PYTHONPATH as sitecustomize.py, it logs each safetensors file a process opens, with
# its torchrun RANK, to $DATAGEN_TEST_READS (transformers reads weights through safe_open).
READ_LOGGER = """
import os
import safetensors

_safe_open = safetensors.safe_open


def _logged_safe_open(filename, *args, **kwargs):
    with open(os.environ["DATAGEN_TEST_READS"], "a") as log:
        log.write(os.environ.get("RANK", "-") + "\\t" + os.fspath(filename) + "\\n")
    return _safe_open(filename, *args, **kwargs)


safetensors.safe_open = _logged_safe_open
"""


def logging_safetensors_reads(folder) -> tuple[dict[str, str], object]:
    """(environment that logs every safetensors open per rank, the log's path)."""
    (folder / "hook").mkdir()
    (folder / "hook" / "sitecustomize.py").write_text(READ_LOGGER)
    log = folder / "reads.tsv"
    path = os.pathsep.join(p for p in (str(folder / "hook"), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "DATAGEN_TEST_READS": str(log)}, log


def weight_reads_by_rank(log, model_folder) -> dict[str, list[str]]:
    reads: dict[str, list[str]] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        rank, filename = line.split("\t", 1)
        if os.path.realpath(filename).startswith(os.path.realpath(model_folder) + os.sep):
            reads.setdefault(rank, []).append(filename)
    return reads


# ---------------------------------------------------------------- batches and launching (no processes)


def test_ranks_share_each_global_step_between_them():
    chunk = ["b0", "b1", "b2", "b3", "b4", "b5"]  # grad_accum 3 x 2 ranks
    shares = [rank_share(chunk, rank, 2) for rank in range(2)]
    assert shares == [["b0", "b2", "b4"], ["b1", "b3", "b5"]]
    assert sorted(shares[0] + shares[1]) == chunk
    with pytest.raises(ValueError, match="do not split evenly"):
        rank_share(chunk[:5], 0, 2)


def test_torchrun_command_for_one_node_and_several():
    worker = ["data.jsonl", "--out", "out"]
    assert torchrun_command("py", 2, worker) == [
        "py", "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
        "-m", "datagen.finetune", *worker]
    assert torchrun_command("py", 4, worker, nnodes="2", node_rank=1, master_addr="n0", master_port=29500)[3:13] == [
        "--nproc-per-node", "4", "--nnodes", "2", "--node-rank", "1", "--master-addr", "n0", "--master-port", "29500"]
    elastic = torchrun_command("py", 8, worker, nnodes="1:4", rdzv_endpoint="n0:29400")
    assert elastic[5:11] == ["--nnodes", "1:4", "--rdzv-backend", "c10d", "--rdzv-endpoint", "n0:29400"]
    with pytest.raises(ConfigError, match="--nproc: must be at least 1"):
        torchrun_command("py", 0, worker)


def test_the_number_of_ranks_is_part_of_a_checkpoints_fingerprint():
    config, ids = FinetuneConfig(), [[1, 2, 3]]
    assert fingerprint(config, ids, "base") == fingerprint(config, ids, "base", world_size=1)
    assert fingerprint(config, ids, "base", world_size=2) != fingerprint(config, ids, "base")
    # ddp and fsdp save the optimiser state in different layouts: neither resumes the other
    assert fingerprint(FinetuneConfig(distributed="fsdp"), ids, "base", 2) != fingerprint(config, ids, "base", 2)


def _on_main_worker(rank: int, store: str, report: str) -> None:
    """One of two gloo ranks: rank 0 alone runs three actions (a result to share, a refused
    config, a crash); each rank writes what it got or raised."""
    import torch.distributed as dist

    from datagen.finetune.distributed import DistContext
    from datagen.finetune.run import on_main

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    context = DistContext(rank=rank, world_size=2, backend="gloo")

    def refuse():
        raise ConfigError("finetune.packing: refused")

    def crash():
        raise OSError("adapter_model.safetensors: truncated")

    got = [on_main(context, True, lambda: f"note from rank {rank}", share=True),
           on_main(context, True, lambda: f"kept by rank {rank}")]
    for action in (refuse, crash):
        try:
            on_main(context, True, action)
            got.append(None)
        except Exception as error:  # noqa: BLE001 - what each rank raised is the point
            got.append(f"{type(error).__name__}: {error}")
    dist.destroy_process_group()
    with open(f"{report}.{rank}", "w") as out:
        json.dump(got, out)


def test_what_rank_0_alone_runs_reaches_every_rank_result_or_failure(tmp_path):
    """No rank waits in a collective for a rank 0 that failed: its ConfigError is every
    rank's, any other failure becomes one error line on the others."""
    import torch.multiprocessing as mp

    context = mp.start_processes(_on_main_worker, args=(str(tmp_path / "store"), str(tmp_path / "got")),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=max(1, deadline - time.monotonic())):
        assert time.monotonic() < deadline, "a rank hangs"
    got = [json.loads((tmp_path / f"got.{rank}").read_text()) for rank in (0, 1)]
    assert got[0] == ["note from rank 0", "kept by rank 0", "ConfigError: finetune.packing: refused",
                      "OSError: adapter_model.safetensors: truncated"]
    assert got[1] == ["note from rank 0", None, "ConfigError: finetune.packing: refused",
                      "DatagenError: rank 0 failed: OSError: adapter_model.safetensors: truncated"]
    ran = []  # without only_main every rank runs the action itself
    from datagen.finetune.distributed import DistContext
    from datagen.finetune.run import on_main

    assert on_main(DistContext(rank=1, world_size=1), False, lambda: ran.append(1) or "own") == "own"
    assert ran == [1]


def _gather_worker(rank: int, store: str, student: str, report: str) -> None:
    """One of two gloo ranks: a tiny LoRA student sharded with FSDP2 (as a run shards it); each
    rank writes the names and shapes of what `trainable_state_dict` gathered for it, and of
    its trainable parameters before sharding."""
    import torch
    import torch.distributed as dist

    from datagen.finetune.distributed import DistContext, trainable_state_dict, wrap
    from datagen.finetune.losses import loss_module
    from datagen.finetune.model import load_student

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    context = DistContext(rank=rank, world_size=2, backend="gloo")
    torch.manual_seed(0)
    model = load_student(FinetuneConfig(base=student, r=4), student, "cpu")
    trainable = {f"model.{name}": list(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    wrapped = wrap(loss_module(model, True), model, "fsdp", context)
    gathered = trainable_state_dict(wrapped, context, "fsdp")
    dist.destroy_process_group()
    with open(f"{report}.{rank}", "w") as out:
        json.dump({"gathered": {key: list(value.shape) for key, value in gathered.items()},
                   "trainable": trainable, "all": len(model.state_dict())}, out)


@pytest.mark.slow  # two processes that each build and shard a student (~15 s here)
def test_fsdp_gathers_only_the_adapter_for_checkpoints(embedded_model_path, tmp_path):
    """What a checkpoint or the final adapter gathers onto rank 0's host from FSDP2's shards is
    the trainable (LoRA) parameters, whole; never the frozen base (140 GB for a 70B student)."""
    import torch.multiprocessing as mp
    from transformers import AutoTokenizer

    tiny_model(tmp_path / "tiny", AutoTokenizer.from_pretrained(embedded_model_path))
    context = mp.start_processes(_gather_worker, args=(str(tmp_path / "store"), str(tmp_path / "tiny"),
                                                       str(tmp_path / "got")), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=max(1, deadline - time.monotonic())):
        assert time.monotonic() < deadline, "a rank hangs"
    got = [json.loads((tmp_path / f"got.{rank}").read_text()) for rank in (0, 1)]
    assert got[0]["gathered"] == got[0]["trainable"]  # every LoRA weight, at its whole (unsharded) shape
    assert all("lora_" in key for key in got[0]["gathered"]) and len(got[0]["gathered"]) == 2 * 2 * 7
    assert got[0]["all"] > len(got[0]["gathered"])  # the base was there to leave out
    assert got[1]["gathered"] == {}  # gathered to rank 0 alone


def test_each_rank_resumes_its_own_rng_state():
    """A checkpoint keeps every rank's torch and CUDA generator states; each rank gets its own
    back. Checkpoints made before kept CUDA's of rank 0 only: only rank 0 restores it."""
    from datagen.finetune.checkpoints import RNG_BY_RANK, rank_rng_state

    state = {RNG_BY_RANK: [{"torch": "cpu 0", "cuda": "gpu 0"}, {"torch": "cpu 1", "cuda": "gpu 1"}]}
    assert [rank_rng_state(state, rank) for rank in (0, 1)] == state[RNG_BY_RANK]
    old = {"torch_rng": "cpu 0", "torch_rng_by_rank": ["cpu 0", "cpu 1"], "cuda_rng": ["gpu 0", "gpu 0b"]}
    assert rank_rng_state(old, 0) == {"torch": "cpu 0", "cuda": ["gpu 0", "gpu 0b"], "cuda_all_devices": True}
    assert rank_rng_state(old, 1) == {"torch": "cpu 1", "cuda": None, "cuda_all_devices": True}


@pytest.mark.parametrize(("args", "expected"), [
    (["--distributed", "foo"], "error: --distributed: input should be 'ddp' or 'fsdp'"),
    (["--nproc", "0"], "error: --nproc: must be at least 1 (got 0)"),
    (["--beta", "0.2"], "error: --beta: only with --method dpo"),
])
def test_bad_distributed_settings_are_one_error_line(tmp_path, args, expected):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(2))
    result = run_cli("finetune", str(data), "--out", str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert single_error_line(result).lower().startswith(expected.lower())
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_rank_that_fails_is_one_error_line(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(2))
    missing = tmp_path / "no-such-student"
    result = run_cli("finetune", str(data), "--out", str(tmp_path / "out"), "--nproc", "2", "--base", str(missing))
    assert result.returncode != 0
    line = single_error_line(result)  # not one per rank, and no torchrun traceback
    assert line.startswith("error: ") and str(missing) in line, line


def test_bad_distributed_in_the_config_file_names_the_field(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(2))
    config = config_file(tmp_path / "c.yaml", distributed="foo")
    result = run_cli("finetune", str(data), "--out", str(tmp_path / "out"), "--config", config, "--nproc", "2")
    assert result.returncode == 2
    assert "finetune.distributed" in single_error_line(result)


# ---------------------------------------------------------------- real torchrun, 2 ranks, gloo


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "packing"), [("ddp", False), ("fsdp", False), ("ddp", True)])
def test_two_ranks_train_what_one_process_with_accumulation_trains(setup, tmp_path, strategy, packing):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, data, reference = setup
    if packing:
        train(FinetuneConfig(base=str(folder / "tiny"), grad_accum=2, packing=True, max_length=128,
                             **SETTINGS), data,
              tmp_path / "one", show_progress=False)
        reference = log_of(tmp_path / "one")
    out = tmp_path / strategy
    env, reads = logging_safetensors_reads(tmp_path)
    result = launch(setup, out, "--distributed", strategy, merge=True, packing=packing, env=env,
                    **({"max_length": 128} if packing else {}))
    assert result.returncode == 0, result.stderr[-3000:]
    # ddp: every rank reads the student; fsdp: rank 0 alone, the others get their shards from it
    read_by = weight_reads_by_rank(reads, folder / "tiny")
    assert sorted(read_by) == (["0"] if strategy == "fsdp" else ["0", "1"]), read_by
    assert f"2 ranks ({strategy}, gloo), global batch 8 {'rows' if packing else 'sequences'}" in result.stderr
    assert "tok/s/rank" in result.stderr
    log = log_of(out)
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    assert [e["tokens"] for e in log] == [e["tokens"] for e in reference]
    assert [e["supervised"] for e in log] == [e["supervised"] for e in reference]
    assert [e["loss"] for e in log] == pytest.approx([e["loss"] for e in reference], rel=1e-5)
    assert [e["grad_norm"] for e in log] == pytest.approx([e["grad_norm"] for e in reference], rel=1e-3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed"] == strategy and summary["global_batch"] == 8
    # the checkpoint keeps each rank's own RNG states (seeded seed + rank), a CUDA slot in each
    rngs = torch.load(out / "checkpoints" / "step-000004" / "state.pt", weights_only=False)["rng_by_rank"]
    assert [sorted(r) for r in rngs] == [["cuda", "torch"]] * 2 and [r["cuda"] for r in rngs] == [None, None]
    assert not torch.equal(rngs[0]["torch"], rngs[1]["torch"])
    assert summary["tokens_per_s_per_rank"] == pytest.approx(summary["tokens_per_s"] / 2, rel=0.01)
    assert len(summary["peak_memory_mib_per_rank"]) == 2

    # the adapter (gathered from shards under fsdp) loads, and the merged model is base + adapter
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    base = AutoModelForCausalLM.from_pretrained(folder / "tiny", dtype=torch.float32).eval()
    with torch.inference_mode():
        plain = base(input_ids=ids).logits
    adapted_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    with torch.inference_mode():
        adapted = adapted_model(input_ids=ids).logits
        direct = merged(input_ids=ids).logits
    assert torch.allclose(adapted, direct, atol=1e-4)
    assert (adapted - plain).abs().max() > 1e-3


def _worker_of_rank(parent_pid: int, rank: int) -> int | None:
    import psutil

    for child in psutil.Process(parent_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "datagen.finetune" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def kill_rank_after_checkpoint(command: list[str], state_file, rank: int = 1) -> str:
    """Start `command` (a `--nproc 2` launch), SIGKILL rank `rank` once `state_file` (a
    checkpoint's state.pt) exists, check the launch failed as one, return its stderr."""
    launch = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not state_file.exists():
        assert launch.poll() is None, "ended before the checkpoint:\n" + launch.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    victim = _worker_of_rank(launch.pid, rank)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    _out, stderr = launch.communicate(timeout=300)
    assert launch.returncode != 0
    assert "torchrun: a rank failed" in stderr
    return stderr


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_kill_9_of_one_rank_then_a_rerun_resumes_and_ends_on_the_same_losses(setup, tmp_path, strategy):
    folder, data, _reference = setup
    settings = {**SETTINGS, "max_steps": 40, "save_every": 5, "distributed": strategy}
    unbroken = tmp_path / "unbroken"
    train(FinetuneConfig(base=str(folder / "tiny"), grad_accum=2, **settings), data, unbroken, show_progress=False)

    out = tmp_path / "out"
    config = config_file(tmp_path / "c.yaml", base=str(folder / "tiny"), **settings)
    command = [sys.executable, "-m", "datagen.cli", "finetune", str(data), "--out", str(out), "--config", config,
               "--nproc", "2"]
    kill_rank_after_checkpoint(command, out / "checkpoints" / "step-000005" / "state.pt")
    assert not (out / "adapter").exists()

    second = run_cli("finetune", str(data), "--out", str(out), "--config", config, "--nproc", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["finished"] and 5 <= resumed["resumed_from_step"] < 40
    again, expected = log_of(out), log_of(unbroken)
    assert [e["step"] for e in again] == list(range(1, 41))
    assert [e["loss"] for e in again] == pytest.approx([e["loss"] for e in expected], rel=1e-4)


# ---------------------------------------------------------------- GPUs


@pytest.mark.gpu
@pytest.mark.slow  # torchrun, the embedded model
def test_qlora_under_ddp_on_two_gpus(tmp_path):
    """QLoRA's simple default under several GPUs: a whole 4-bit student on each."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    pytest.importorskip("bitsandbytes")
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(32))
    config = config_file(tmp_path / "c.yaml", **{**SETTINGS, "learning_rate": 1e-3, "max_steps": 6})
    result = run_cli("finetune", str(data), "--out", str(tmp_path / "out"), "--config", config, "--nproc", "2",
                     "--method", "qlora")
    assert result.returncode == 0, result.stderr[-3000:]
    log = log_of(tmp_path / "out")
    assert log[-1]["loss"] < log[0]["loss"]


def test_qlora_under_fsdp_is_refused_when_the_config_is_read(tmp_path):
    """Sharding bitsandbytes' 4-bit weights with fully_shard is reported to corrupt them: one
    error line as the settings are read, before torchrun starts or anything loads."""
    from pydantic import ValidationError

    from datagen.finetune.config import QLORA_FSDP_REFUSAL, DPOConfig

    for config_class in (FinetuneConfig, DPOConfig):
        with pytest.raises(ValidationError, match="method qlora under fsdp is not supported yet"):
            config_class(method="qlora", distributed="fsdp")
        config_class(method="qlora", distributed="ddp")
        config_class(method="lora", distributed="fsdp")
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(2))
    result = run_cli("finetune", str(data), "--out", str(tmp_path / "out"), "--method", "qlora",
                     "--distributed", "fsdp", "--nproc", "2")
    assert result.returncode == 2
    assert single_error_line(result) == f"error: --distributed: Value error, {QLORA_FSDP_REFUSAL}"
    config = config_file(tmp_path / "c.yaml", method="qlora", distributed="fsdp")
    result = run_cli("finetune", str(data), "--out", str(tmp_path / "out"), "--config", config, "--nproc", "2")
    assert result.returncode == 2
    assert single_error_line(result) == f"error: {config}: finetune.distributed: Value error, {QLORA_FSDP_REFUSAL}"
    assert not (tmp_path / "out").exists()
