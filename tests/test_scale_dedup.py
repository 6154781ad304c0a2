"""`datagen dedup --engine datatrove|ray|slurm` makes the single-process run's decisions.

A corpus with planted duplicates of every kind the single-process path handles (exact
copies, one-word edits, a chain A~B~C, identical token sequences, the keep rule choosing a
later task, a CJK pair, invalid lines) is deduplicated by today's `run_filter` and by the
datatrove stages on the local and the Ray executor; kept ids, rejects (reasons, keepers,
details, order) and the stats' counts must be the same. Slurm: the sbatch scripts the
executors submit (to an `sbatch` on PATH that only records them: there is no Slurm here).
"""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from datagen.config_file import load_config
from datagen.engines.datatrove_run import EngineOptions
from datagen.engines.sharded_dedup import ScaleDedupPlan, build_executors, run_scaled_dedup
from datagen.engines.shards import shard_lines
from datagen.errors import InputError
from datagen.filtering import run_filter
from datagen.filters.dedup import DedupConfig
from datagen.records import Instance, Task
from tests.helpers import run_cli, single_error_line

WORDS = ("river mountain violin copper garden winter planet orchid lantern harbor falcon meadow "
         "crystal thunder pepper marble canyon saddle velvet glacier compass ember willow quartz "
         "beacon cedar dune fossil harvest island jasmine kettle lagoon maple nectar oasis pebble").split()
VERBS = ["Describe", "Explain", "List", "Compare", "Summarize", "Translate", "Classify", "Rewrite"]


def corpus(count: int = 150, seed: int = 7) -> list[Task]:
    """Distinct tasks with planted duplicates; a chain A~B~C (A~C too far apart) among them."""
    rng = random.Random(seed)
    tasks: list[Task] = []
    for i in range(count):
        words = rng.sample(WORDS, 9)
        tasks.append(Task(id=f"t{i}", instruction=f"{rng.choice(VERBS)} the {' '.join(words)}.",
                          instances=[Instance(output="x" * rng.randint(1, 9))] * rng.randint(0, 3)))
    planted: list[Task] = []
    for i, original in enumerate(rng.sample(tasks, 30)):
        words = original.instruction.rstrip(".").split()
        words[rng.randrange(1, len(words))] = rng.choice(WORDS)  # one-word edit
        planted.append(Task(id=f"near{i}", instruction=" ".join(words) + ".",
                            instances=[Instance(output="y")] * rng.randint(0, 4)))
    planted += [Task(id=f"copy{i}", instruction=t.instruction.upper() + "!", instances=t.instances)
                for i, t in enumerate(rng.sample(tasks, 10))]
    planted += [
        Task(id="A", instruction="alpha bravo charlie delta echo foxtrot golf hotel india juliet",
             instances=[Instance(output="a")] * 6),
        Task(id="B", instruction="bravo alpha delta charlie echo foxtrot golf hotel india juliet",
             instances=[Instance(output="b")] * 5),
        Task(id="C", instruction="bravo alpha delta charlie foxtrot echo hotel golf india juliet"),
        Task(id="sum", instruction="What is 2+2 in words?", instances=[Instance(output="four")]),
        Task(id="diff", instruction="What is 2-2 in words?", instances=[Instance(output="zero")] * 2),
        Task(id="zh1", instruction="请把这句话翻译成法语并解释语法"),
        Task(id="zh2", instruction="请把这句话翻译成德语并解释语法"),
        Task(id="symbols", instruction="+++ ---"),
    ]
    for extra in planted:  # spread them through the file so they fall in different shards
        tasks.insert(rng.randrange(len(tasks) + 1), extra)
    return tasks


def write_corpus(path: Path, tasks: list[Task], bad_lines: bool = False) -> Path:
    lines = [task.to_json() for task in tasks]
    if bad_lines:
        lines.insert(17, '{"id": "broken", ')
        lines.insert(90, tasks[3].to_json())  # an id an earlier line used: the same task repeated
        lines.insert(40, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def single_process(source: Path, out: Path, config: DedupConfig, skip_invalid: bool = False) -> dict:
    settings = load_config(None, {"filter.passes": ("--passes", ["exact-dedup", "near-dedup"]),
                                  "filter.skip_invalid": ("--skip-invalid", skip_invalid or None)})
    settings.filter.dedup = config
    return run_filter(settings, source, out, out.with_suffix(".rejects.jsonl"), "")


def outputs(out: Path) -> tuple[list[str], list[dict]]:
    kept = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    rejects = [json.loads(line) for line in out.with_suffix(".rejects.jsonl").read_text().splitlines()]
    return kept, rejects


def scaled(tmp_path: Path, source: Path, name: str, engine: str, tasks: int, config: DedupConfig,
           skip_invalid: bool = False, workers: int = -1) -> dict:
    out = tmp_path / f"{name}.jsonl"
    plan = ScaleDedupPlan(source, out, out.with_suffix(".rejects.jsonl"), tmp_path / f"{name}.work", config,
                          tasks=tasks, skip_invalid=skip_invalid)
    return run_scaled_dedup(plan, engine, EngineOptions(workers=workers, mem_per_cpu_gb=0.25))


def same_counts(a: dict, b: dict) -> None:
    assert (a["in"], a["kept"], a["rejected"], a["invalid_lines"]) == (b["in"], b["kept"], b["rejected"],
                                                                       b["invalid_lines"])
    for pa, pb in zip(a["passes"], b["passes"]):
        assert {k: pa[k] for k in ("pass", "in", "out", "reasons")} == {k: pb[k] for k in ("pass", "in", "out",
                                                                                           "reasons")}


def test_shards_cover_every_line_once(tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "in.jsonl", corpus(40))
    lines = source.read_bytes().splitlines(keepends=True)
    for shards in (1, 3, 7, 200):
        got = [raw for rank in range(shards) for _, _, raw in shard_lines(source, rank, shards)]
        assert got == lines


@pytest.mark.parametrize("config", [
    DedupConfig(),
    DedupConfig(keep="first", cluster="connected"),
    DedupConfig(keep="longest_output", verify=False, fields="task"),
], ids=["default", "connected", "no-verify"])
def test_local_executor_matches_single_process(tmp_path: Path, config: DedupConfig) -> None:
    source = write_corpus(tmp_path / "in.jsonl", corpus())
    reference = single_process(source, tmp_path / "single.jsonl", config)
    assert reference["rejected"] >= 40  # the planted duplicates are found at all
    want = outputs(tmp_path / "single.jsonl")
    if config.cluster == "star" and config.verify:
        kept = set(want[0])
        assert {"A", "C"} <= kept and "B" not in kept  # the chain: B goes, C (not a duplicate of A) stays
    for tasks, workers in ((1, 1), (3, 2)):
        stats = scaled(tmp_path, source, f"local{tasks}", "datatrove", tasks, config, workers=workers)
        assert outputs(tmp_path / f"local{tasks}.jsonl") == want
        same_counts(stats, reference)
        assert stats["passes"][1]["report"].split(",")[0] == reference["passes"][1]["report"].split(",")[0]
        assert not (tmp_path / f"local{tasks}.work").exists()


def test_invalid_lines_are_rejected_or_stop_the_run_as_before(tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "in.jsonl", corpus(60), bad_lines=True)
    reference = single_process(source, tmp_path / "single.jsonl", DedupConfig(), skip_invalid=True)
    stats = scaled(tmp_path, source, "local", "datatrove", 3, DedupConfig(), skip_invalid=True, workers=1)
    assert outputs(tmp_path / "local.jsonl") == outputs(tmp_path / "single.jsonl")
    same_counts(stats, reference)
    assert stats["invalid_lines"] == 2

    single = run_cli("dedup", str(source), "--out", str(tmp_path / "a.jsonl"))
    sharded = run_cli("dedup", str(source), "--out", str(tmp_path / "b.jsonl"), "--engine", "datatrove", "--tasks", "3")
    assert single.returncode == sharded.returncode != 0
    assert single_error_line(sharded) == single_error_line(single)
    assert "(and 1 more bad lines); fix it or pass --skip-invalid" in single_error_line(sharded)


@pytest.mark.slow
def test_ray_executor_matches_single_process(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    source = write_corpus(tmp_path / "in.jsonl", corpus())
    reference = single_process(source, tmp_path / "single.jsonl", DedupConfig())
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        stats = scaled(tmp_path, source, "ray", "ray", 2, DedupConfig())
    finally:
        ray.shutdown()
    assert outputs(tmp_path / "ray.jsonl") == outputs(tmp_path / "single.jsonl")
    same_counts(stats, reference)


def test_slurm_submits_a_chain_of_array_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = stand_in_sbatch(tmp_path, monkeypatch)
    source = write_corpus(tmp_path / "in.jsonl", corpus(40))
    plan = ScaleDedupPlan(source, tmp_path / "kept.jsonl", tmp_path / "rejects.jsonl", tmp_path / "work",
                          DedupConfig(), tasks=8)
    result = run_scaled_dedup(plan, "slurm", EngineOptions(partition="cpu", time="02:00:00", workers=4))
    scripts = [(record / f"{n}.slurm").read_text() for n in range(14)]  # 7 stages, each + its merge_stats job
    args = [(record / f"{n}.args").read_text() for n in range(14)]
    stages = [s for s in scripts if "launch_pickled_pipeline" in s]
    assert [s.split("--job-name=datagen-dedup-")[1].split()[0] for s in stages] == [
        "read", "group", "signatures", "buckets", "decide", "write", "collect"]
    arrays = [s.split("#SBATCH --array=")[1].split()[0] for s in stages]
    assert arrays == ["0-7%4", "0-0", "0-7%4", "0-7%4", "0-0", "0-7%4", "0-0"]  # buckets: min(tasks, 25 bands)
    for script in stages:
        assert "#SBATCH --partition=cpu" in script and "#SBATCH --time=02:00:00" in script
        assert f"source {Path(sys.prefix) / 'bin' / 'activate'}" in script
        assert f"launch_pickled_pipeline {tmp_path / 'work' / 'logs'}" in script
    stage_args = [a for a, s in zip(args, scripts) if "launch_pickled_pipeline" in s]
    assert "--dependency" not in stage_args[0]
    assert all("--dependency=afterok:" in a for a in stage_args[1:])  # each waits for the one before
    assert result["submitted"] == ["100", "102", "104", "106", "108", "110", "112"]
    assert (tmp_path / "work" / "logs" / "read" / "executor.pik").exists()


def stand_in_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No Slurm here: an `sbatch` on PATH that records each script it is handed (N.slurm, its
    arguments in N.args) and answers job id 100 + N, and the `scontrol` a job calls. Returns
    the folder `sbatch` records in."""
    record = tmp_path / "submitted"
    record.mkdir()
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.parent.mkdir()
    sbatch.write_text(f'#!/bin/sh\nn=$(ls {record} | grep -c slurm)\ncp "$(eval echo \\${{$#}})" {record}/$n.slurm\n'
                      f'echo "$@" > {record}/$n.args\necho "Submitted batch job $((100 + n))"\n')
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    scontrol = sbatch.parent / "scontrol"  # `scontrol show hostnames` in a job: this machine
    scontrol.write_text("#!/bin/sh\necho localhost\n")
    scontrol.chmod(sbatch.stat().st_mode)
    monkeypatch.setenv("PATH", f"{sbatch.parent}:{os.environ['PATH']}")
    return record


def run_submitted_jobs(record: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, BaseException] | None:
    """Run the recorded array jobs in submission order (each waits for the one before) as Slurm
    would, here in-process: each array task loads the pickled executor and runs it with its
    SLURM_ARRAY_TASK_ID, as `launch_pickled_pipeline` does. The first job with a failing task
    ends the chain (afterok). Returns (its stage, the error), or None when every job succeeded."""
    import dill

    monkeypatch.setenv("SLURM_NODELIST", "localhost")  # what Slurm sets in every job
    for script in sorted(record.glob("*.slurm"), key=lambda path: int(path.stem)):
        text = script.read_text()
        if "launch_pickled_pipeline" not in text:
            continue  # datatrove's merge_stats job
        pickled = Path(text.split("launch_pickled_pipeline ")[1].split()[0])
        with pickled.open("rb") as file:
            executor = dill.load(file)
        try:
            for task in range(len(json.loads((pickled.parent / "ranks_to_run.json").read_text()))):
                monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
                executor.run()
        except Exception as error:  # noqa: BLE001 - what makes the job fail
            return executor.pipeline[0].stage, error
    return None


def test_slurm_fails_the_chain_at_the_job_that_finds_an_input_error(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    record = stand_in_sbatch(tmp_path, monkeypatch)
    source = write_corpus(tmp_path / "in.jsonl", corpus(60), bad_lines=True)
    plan = ScaleDedupPlan(source, tmp_path / "kept.jsonl", tmp_path / "rejects.jsonl", tmp_path / "work",
                          DedupConfig(), tasks=3)
    run_scaled_dedup(plan, "slurm", EngineOptions(partition="cpu"))
    # the jobs waiting on a failed one are cancelled, not left pending forever
    assert all("#SBATCH --kill-on-invalid-dep=yes" in path.read_text() for path in record.glob("*.slurm"))
    stage, error = run_submitted_jobs(record, monkeypatch)
    # the group job fails with the single-process run's line; it used to end "completed" and the
    # next job failed on a missing file, the cause left in work/group/error.txt
    assert stage == "group" and isinstance(error, InputError)
    single = run_cli("dedup", str(source), "--out", str(tmp_path / "a.jsonl"))
    assert single_error_line(single) == f"error: {error}"
    assert not (tmp_path / "kept.jsonl").exists()


def test_bad_flags_get_one_error_line(tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "in.jsonl", corpus(40))
    for flags, message in [
        (["--engine", "spark"], "--engine: expected one of local, datatrove, ray, slurm, got 'spark'"),
        (["--engine", "datatrove", "--tasks", "0"], "--tasks: must be at least 1, got 0"),
        (["--engine", "slurm", "--tasks", "2"], "--engine slurm needs --partition"),
        (["--tasks", "4"], "--tasks needs --engine datatrove, ray or slurm"),
    ]:
        result = run_cli("dedup", str(source), "--out", str(tmp_path / "k.jsonl"), *flags)
        assert result.returncode == 2, result.stderr
        assert single_error_line(result) == f"error: {message}"


def test_executors_are_built_per_stage(tmp_path: Path) -> None:
    plan = ScaleDedupPlan(tmp_path / "in.jsonl", tmp_path / "k.jsonl", tmp_path / "r.jsonl", tmp_path / "w",
                          DedupConfig(), tasks=40)
    executors = build_executors(plan, "datatrove", EngineOptions(workers=2))
    assert [(e.pipeline[0].stage, e.world_size, e.workers) for e in executors] == [
        ("read", 40, 2), ("group", 1, 1), ("signatures", 40, 2), ("buckets", 25, 2), ("decide", 1, 1),
        ("write", 40, 2), ("collect", 1, 1)]


def test_help_does_not_import_datatrove_or_ray() -> None:
    probe = (
        "import sys; from datagen.cli import main\n"
        "for args in (['--help'], ['dedup', '--help']):\n"
        "    try: main(args)\n"
        "    except SystemExit: pass\n"
        "print('LOADED', [m for m in ('datatrove', 'ray') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "--engine" in result.stdout and "LOADED []" in result.stdout


def test_an_engine_without_the_ray_extra_is_one_error_line(tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "in.jsonl", corpus(40))
    probe = (  # datatrove made unimportable, as on a base install
        "import sys; sys.modules['datatrove'] = None; from datagen.cli import main\n"
        f"main(['dedup', {str(source)!r}, '--out', {str(tmp_path / 'k.jsonl')!r}, '--engine', 'datatrove'])"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert single_error_line(result).startswith("error: --engine datatrove: needs datatrove and ray[data]")
    assert not (tmp_path / "k.jsonl").exists()


def test_empty_and_tiny_inputs(tmp_path: Path) -> None:
    pair = [Task(id="a", instruction="Name a long river in Europe and its sources."),
            Task(id="b", instruction="Name a long river in Europe and its source.")]  # 3 shards: one is empty
    for name, tasks in (("empty", []), ("one", corpus(40)[:1]), ("copies", [pair[0], pair[0].model_copy(
            update={"id": "c"})]), ("two", pair)):
        source = write_corpus(tmp_path / f"{name}.jsonl", tasks) if tasks else tmp_path / "empty.jsonl"
        if not tasks:
            source.write_text("")
        reference = single_process(source, tmp_path / f"{name}-single.jsonl", DedupConfig())
        stats = scaled(tmp_path, source, name, "datatrove", 3, DedupConfig(), workers=1)
        assert outputs(tmp_path / f"{name}.jsonl") == outputs(tmp_path / f"{name}-single.jsonl")
        same_counts(stats, reference)
        assert stats["rejected"] == (0 if name in ("empty", "one") else 1)
