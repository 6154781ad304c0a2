"""`datagen filter --engine datatrove|ray` writes what the single-process `datagen filter` writes.

A planted corpus (heuristic rejects, decontamination hits, exact and near duplicates with a
chain A~B~C, hand marks, invalid lines) goes through today's `run_filter` and through the
sharded stages on datatrove's local and Ray executors; kept tasks, rejects (stage, reason,
detail, keeper, order) and the per-pass counts must be the same. The judge's teacher is an
OpenAI-compatible HTTP server on 127.0.0.1 that scores from the prompt text (the real
engines are covered elsewhere); it counts requests, so the shared request cache is checked.
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from datagen.config_file import load_config
from datagen.engines.datatrove_run import EngineOptions
from datagen.engines.sharded_filter import ScaleFilterPlan, run_scaled_filter
from datagen.errors import InputError
from datagen.filtering import run_filter
from datagen.records import Instance, Task
from tests.helpers import run_cli, single_error_line
from tests.test_scale_dedup import corpus, run_submitted_jobs, stand_in_sbatch

ALL_PASSES = ["heuristics", "decontaminate", "exact-dedup", "near-dedup", "judge", "manual"]


class JudgeServer:
    """/v1/chat/completions answering "Score: 2" when the graded response holds a "y", else "Score: 5"."""

    def __init__(self) -> None:
        self.requests = 0
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    server.requests += 1
                prompt = body["messages"][-1]["content"]
                graded = prompt.split("Response:", 1)[1].split("Reply in exactly", 1)[0]
                text = "Score: 2\nRationale: has a y" if "y" in graded else "Score: 5\nRationale: fine"
                reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def judge_server():
    server = JudgeServer()
    yield server
    server.close()


def planted(tmp_path: Path, bad_lines: bool = False) -> Path:
    """The dedup test's corpus (duplicates, the chain) with every task answered, plus heuristic
    rejects; evals.txt (two contaminated instructions) and marks.jsonl (hand marks) beside it."""
    tasks = [task if task.instances else task.model_copy(update={"instances": [Instance(output="fine")]})
             for task in corpus(120)]
    extras = [
        Task(id="refuses", instruction="Describe the ocean floor in detail please.",
             instances=[Instance(output="I'm sorry, but I cannot do that.")]),
        Task(id="short", instruction="Do it now", instances=[Instance(output="ok")]),
        Task(id="program", instruction="Write a program that sorts numbers quickly.",
             instances=[Instance(output="sorted")]),
        Task(id="both", instruction="Give me one long answer about it", instances=[Instance(input="a:", output="b")]),
    ]
    for offset, extra in enumerate(extras):
        tasks.insert(20 + 37 * offset, extra)
    lines = [task.to_json() for task in tasks]
    if bad_lines:
        lines.insert(11, '{"id": "broken", ')
        lines.insert(70, tasks[5].to_json())  # an id an earlier line used
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "evals.txt").write_text(f"{tasks[7].instruction}\nunrelated words here\n{tasks[90].instruction}\n")
    marks = [{"id": "t0", "decision": "drop", "note": "wrong"}, {"id": "t45", "decision": "drop"},
             {"id": "t1", "decision": "keep"}, {"id": "near4", "decision": "drop"},  # near4: a near duplicate
             {"id": "not-in-input", "decision": "drop"}]
    (tmp_path / "marks.jsonl").write_text("".join(json.dumps(mark) + "\n" for mark in marks))
    return source


def settings(tmp_path: Path, passes: list[str], judge_url: str | None = None, cache: Path | None = None,
             skip_invalid: bool = False):
    config = load_config(None, {
        "filter.passes": ("--passes", passes),
        "filter.decontaminate.eval_files": ("--eval", [str(tmp_path / "evals.txt")]),
        "filter.manual.overrides": ("--overrides", str(tmp_path / "marks.jsonl")),
        "filter.skip_invalid": ("--skip-invalid", skip_invalid or None),
        "teacher.backend": ("--backend", "openai" if judge_url else None),
        "teacher.base_url": ("--base-url", judge_url),
        "teacher.cache_dir": ("--cache-dir", str(cache) if cache else None),
    })
    config.filter.decontaminate.ngram = 6
    return config


def outputs(out: Path) -> tuple[list[dict], list[dict]]:
    read = [json.loads(line) for line in out.read_text().splitlines()]
    return read, [json.loads(line) for line in out.with_suffix(".rejects.jsonl").read_text().splitlines()]


def single(tmp_path: Path, config, name: str = "single") -> dict:
    out = tmp_path / f"{name}.jsonl"
    return run_filter(config, tmp_path / "in.jsonl", out, out.with_suffix(".rejects.jsonl"), "")


def scaled(tmp_path: Path, config, name: str, engine: str, tasks: int, workers: int = -1, chunk: int = 1000) -> dict:
    out = tmp_path / f"{name}.jsonl"
    plan = ScaleFilterPlan(tmp_path / "in.jsonl", out, out.with_suffix(".rejects.jsonl"), tmp_path / f"{name}.work",
                           config, tasks=tasks, chunk=chunk)
    return run_scaled_filter(plan, engine, EngineOptions(workers=workers, mem_per_cpu_gb=0.25))


def same_stats(a: dict, b: dict) -> None:
    keys = ("input", "in", "kept", "rejected", "invalid_lines", "config")
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert len(a["passes"]) == len(b["passes"])
    for pa, pb in zip(a["passes"], b["passes"]):
        assert {k: v for k, v in pa.items() if k != "report"} == {k: v for k, v in pb.items() if k != "report"}
        if "report" in pa:  # near dedup: the same counts; its timings differ
            assert pa["report"].split(",")[0] == pb["report"].split(",")[0]
    assert ("teacher" in a) == ("teacher" in b)


def test_local_executor_matches_single_process(tmp_path: Path, judge_server: JudgeServer) -> None:
    planted(tmp_path, bad_lines=True)
    config = settings(tmp_path, ALL_PASSES, judge_server.base_url, tmp_path / "cache", skip_invalid=True)
    reference = single(tmp_path, config)
    want = outputs(tmp_path / "single.jsonl")
    reasons = {(r["stage"], r["reason"]) for r in want[1]}
    assert {("read", "invalid line"), ("heuristics", "too short"), ("decontaminate", "contaminated"),
            ("exact-dedup", "exact duplicate"), ("near-dedup", "near duplicate"),
            ("judge", "judge score below threshold"), ("manual", "dropped by hand")} <= reasons
    assert any(r["reason"].startswith("refusal") for r in want[1])
    kept = {task["id"] for task in want[0]}
    assert "A" in kept and "B" not in kept  # the chain A~B~C: B goes with A
    sent = judge_server.requests
    assert sent > 0

    stats = scaled(tmp_path, config, "local", "datatrove", 3, workers=2, chunk=7)  # chunks split shards too
    assert outputs(tmp_path / "local.jsonl") == want
    same_stats(stats, reference)
    assert judge_server.requests == sent  # every judgement came from the shared cache
    # every judgement a hit: what the single run sent, and the repeats it sent once
    assert stats["teacher"]["cache_hits"] == reference["teacher"]["requests_sent"] + reference["teacher"]["cache_hits"]
    assert not (tmp_path / "local.work").exists()


@pytest.mark.parametrize("passes", [
    ["exact-dedup", "heuristics", "manual"],  # dedup first: it reads the input (and its bad lines)
    ["near-dedup", "decontaminate", "exact-dedup"],  # near alone, then exact alone
], ids=["dedup-first", "near-then-exact"])
def test_other_orders_match_single_process(tmp_path: Path, passes: list[str]) -> None:
    planted(tmp_path, bad_lines=True)
    config = settings(tmp_path, passes, skip_invalid=True)
    reference = single(tmp_path, config)
    stats = scaled(tmp_path, config, "local", "datatrove", 2, workers=1)
    assert outputs(tmp_path / "local.jsonl") == outputs(tmp_path / "single.jsonl")
    same_stats(stats, reference)


@pytest.mark.slow
def test_ray_executor_matches_single_process(tmp_path: Path, judge_server: JudgeServer) -> None:
    ray = pytest.importorskip("ray")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    planted(tmp_path)
    reference = single(tmp_path, settings(tmp_path, ALL_PASSES, judge_server.base_url, tmp_path / "cache1"))
    sent = judge_server.requests
    config = settings(tmp_path, ALL_PASSES, judge_server.base_url, tmp_path / "cache2")  # an empty cache
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        stats = scaled(tmp_path, config, "ray", "ray", 2)
    finally:
        ray.shutdown()
    assert outputs(tmp_path / "ray.jsonl") == outputs(tmp_path / "single.jsonl")
    same_stats(stats, reference)
    # each worker made its own teacher; together they asked each question once
    assert judge_server.requests - sent == reference["teacher"]["requests_sent"] == stats["teacher"]["requests_sent"]


def test_a_rerun_skips_the_finished_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shard 1 of the first per-record stage dies; the rerun starts at that task."""
    import datagen.engines.sharded_filter as scale_filter

    planted(tmp_path)
    config = settings(tmp_path, ["heuristics", "exact-dedup", "manual"])
    single(tmp_path, config)
    ran = tmp_path / "ran"
    ran.mkdir()
    real_check, real_records = scale_filter.check_shard, scale_filter.run_records

    def check_shard(plan, rank, world_size):
        (ran / f"check{rank}.{len(list(ran.iterdir()))}").touch()
        real_check(plan, rank, world_size)

    def run_records(plan, segment, rank, world_size, engine):
        (ran / f"records{segment}-{rank}.{len(list(ran.iterdir()))}").touch()
        if rank == 1 and not (tmp_path / "killed").exists():
            (tmp_path / "killed").touch()
            raise RuntimeError("killed")
        real_records(plan, segment, rank, world_size, engine)

    monkeypatch.setattr(scale_filter, "check_shard", check_shard)
    monkeypatch.setattr(scale_filter, "run_records", run_records)
    with pytest.raises(RuntimeError, match="killed"):  # the run stops there, as a killed one would
        scaled(tmp_path, config, "local", "datatrove", 3, workers=1)
    first = sorted(path.name.split(".")[0] for path in ran.iterdir())
    assert first == ["check0", "check1", "check2", "records0-0", "records0-1"]
    for path in ran.iterdir():
        path.unlink()
    scaled(tmp_path, config, "local", "datatrove", 3, workers=1)
    # check and records0-0 finished before: skipped; the killed task and the ones after it run
    assert sorted(path.name.split(".")[0] for path in ran.iterdir()) == [
        "records0-1", "records0-2", "records2-0", "records2-1", "records2-2"]
    assert outputs(tmp_path / "local.jsonl") == outputs(tmp_path / "single.jsonl")


def test_bad_input_and_unshardable_passes_get_one_error_line(tmp_path: Path) -> None:
    source = planted(tmp_path, bad_lines=True)
    flags = ["--passes", "heuristics,manual", "--overrides", str(tmp_path / "marks.jsonl")]
    local = run_cli("filter", str(source), "--out", str(tmp_path / "a.jsonl"), *flags)
    sharded = run_cli("filter", str(source), "--out", str(tmp_path / "b.jsonl"), *flags,
                      "--engine", "datatrove", "--tasks", "3")
    assert local.returncode == sharded.returncode != 0
    assert single_error_line(sharded) == single_error_line(local)
    assert "(and 1 more bad lines); fix it or pass --skip-invalid" in single_error_line(sharded)
    assert not (tmp_path / "b.jsonl").exists() and not (tmp_path / "b.jsonl.work").exists()

    for extra, message in [
        (["--passes", "heuristics,novelty"], "error: --engine: the novelty pass compares each task with the whole "
                                             "set kept before it and cannot run sharded"),
        (["--passes", "decontaminate"], "error: --eval: the decontaminate pass needs at least one evaluation file"),
        (["--passes", "manual"], "error: filter.manual.overrides: the manual pass needs an overrides file"),
        (["--tasks", "2"], "error: --tasks needs --engine datatrove, ray or slurm"),
    ]:
        engine = [] if "--tasks" in extra else ["--engine", "datatrove"]
        result = run_cli("filter", str(source), "--out", str(tmp_path / "c.jsonl"), "--skip-invalid", *extra, *engine)
        assert result.returncode == 2, result.stderr
        assert single_error_line(result).startswith(message)


def test_slurm_submits_one_chain_of_array_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = stand_in_sbatch(tmp_path, monkeypatch)
    source = planted(tmp_path)
    out = tmp_path / "kept.jsonl"
    plan = ScaleFilterPlan(source, out, tmp_path / "rejects.jsonl", tmp_path / "work",
                           settings(tmp_path, ["heuristics", "exact-dedup", "near-dedup", "manual"]), tasks=4)
    result = run_scaled_filter(plan, "slurm", EngineOptions(partition="cpu", workers=2))
    scripts = sorted(record.glob("*.slurm"), key=lambda path: int(path.stem))
    stages = [(path.read_text(), (record / f"{path.stem}.args").read_text()) for path in scripts
              if "launch_pickled_pipeline" in path.read_text()]
    names = [script.split("--job-name=datagen-filter-")[1].split()[0] for script, _ in stages]
    assert names == ["check", "lines", "records0", "join0", "read", "group", "signatures", "buckets", "decide",
                     "write", "collect", "records2", "collect"]
    assert "--dependency" not in stages[0][1]
    assert all("--dependency=afterok:" in args for _, args in stages[1:])  # one chain, each after the one before
    assert len(result["submitted"]) == len(names)
    assert not out.exists()



def test_slurm_fails_the_chain_at_the_job_that_finds_an_input_error(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    record = stand_in_sbatch(tmp_path, monkeypatch)
    source = planted(tmp_path, bad_lines=True)
    plan = ScaleFilterPlan(source, tmp_path / "kept.jsonl", tmp_path / "rejects.jsonl", tmp_path / "work",
                           settings(tmp_path, ["heuristics", "exact-dedup"]), tasks=2)
    run_scaled_filter(plan, "slurm", EngineOptions(partition="cpu"))
    stage, error = run_submitted_jobs(record, monkeypatch)
    assert stage == "lines" and isinstance(error, InputError)  # not "completed", the cause left in work/
    single = run_cli("filter", str(source), "--out", str(tmp_path / "a.jsonl"), "--passes", "heuristics,exact-dedup")
    assert single_error_line(single) == f"error: {error}"


@pytest.mark.slow
def test_shards_share_the_configured_rate(tmp_path: Path, vllm_server: str) -> None:
    """4 datatrove shards judging through the fault proxy in front of the real server: the
    proxy sees the configured 120 a minute, for the run as a whole (each shard with its own
    budget would send 4 times that)."""
    from tests.fault_proxy import FaultProxy

    tasks, source = fruit_tasks(tmp_path)
    with FaultProxy(vllm_server, {}) as proxy:
        config = judge_config(proxy, tmp_path)
        config.teacher.requests_per_minute = 120  # 2 a second, 2 in the bucket
        plan = ScaleFilterPlan(source, tmp_path / "kept.jsonl", tmp_path / "rejects.jsonl", tmp_path / "work", config,
                               tasks=4, chunk=4)
        run_scaled_filter(plan, "datatrove", EngineOptions(workers=4, mem_per_cpu_gb=0.25))
        arrivals = sorted(proxy.arrivals)
    assert len(arrivals) == len(tasks)
    # in every window from one arrival to a later one: at most the bucket + the rate's refill
    # (+1 for the clock's edges); a bound slowness cannot break
    worst = max(j - i + 1 - (2 + 2 * (arrivals[j] - arrivals[i]))
                for i in range(len(arrivals)) for j in range(i, len(arrivals)))
    assert worst <= 1, f"sent {worst:.1f} past the budget; arrivals {[round(t - arrivals[0], 2) for t in arrivals]}"


def fruit_tasks(tmp_path: Path) -> tuple[list[Task], Path]:
    """16 short tasks to judge, written to in.jsonl."""
    tasks = [Task(id=f"t{n}", instruction=f"Name {size} fruit that is {colour}.",
                  instances=[Instance(output="A plum.")])
             for n, (size, colour) in enumerate((size, colour) for size in ("a small", "a large")
                                                for colour in ("red", "green", "yellow", "purple", "orange", "blue",
                                                               "brown", "pink"))]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(task.to_json() + "\n" for task in tasks))
    return tasks, source


def judge_config(proxy, tmp_path: Path):
    return load_config(None, {"filter.passes": ("--passes", ["judge"]),
                              "teacher.backend": ("--backend", "openai"),
                              "teacher.base_url": ("--base-url", proxy.base_url),
                              "teacher.model": ("--model", "smollm2-135m"),
                              "teacher.cache_dir": ("--cache-dir", str(tmp_path / "cache"))})


@pytest.mark.slow
def test_shards_stop_at_the_runs_spending_cap_and_resume_with_a_higher_one(tmp_path: Path, vllm_server: str) -> None:
    """4 datatrove shards judging share one spending ledger: together they send no request that
    could pass the cap, the run stops with the cap's one line, and a higher cap finishes it
    without sending any request twice (counted by the proxy in front of the real server)."""
    from datagen.filters.judge import JudgeConfig, judge_messages
    from datagen.io import spend_path
    from datagen.teachers.base import Request
    from datagen.teachers.spending import SpendingCapReached, worst_cost
    from datagen.teachers.teacher import PriceTable
    from tests.fault_proxy import FaultProxy

    tasks, source = fruit_tasks(tmp_path)
    prices = PriceTable(input_per_million=1e6, output_per_million=1e6)  # a token costs 1
    worst = max(worst_cost(Request.build(judge_messages(t.instruction, "", "A plum."), JudgeConfig().sampling), prices)
                for t in tasks)
    kept = tmp_path / "kept.jsonl"
    with FaultProxy(vllm_server, {}) as proxy:
        config = judge_config(proxy, tmp_path)
        config.teacher.prices, config.teacher.max_cost = prices, 6 * worst
        plan = ScaleFilterPlan(source, kept, tmp_path / "rejects.jsonl", tmp_path / "work", config, tasks=4, chunk=2)
        with pytest.raises(SpendingCapReached, match=r"^spending cap \S+ reached"):
            run_scaled_filter(plan, "datatrove", EngineOptions(workers=4, mem_per_cpu_gb=0.25))
        # each reply's real cost replaces its worst-case reservation, so more than 6 can fit
        assert 0 < len(proxy.arrivals) < len(tasks)
        assert json.loads(spend_path(kept).read_text())["spent"] <= 6 * worst
        assert not plan.work.exists()  # a rerun does every shard again, from the cache

        config.teacher.max_cost = 100 * worst
        plan = ScaleFilterPlan(source, kept, tmp_path / "rejects.jsonl", tmp_path / "work", config, tasks=4, chunk=2)
        stats = run_scaled_filter(plan, "datatrove", EngineOptions(workers=4, mem_per_cpu_gb=0.25))
        assert len(proxy.arrivals) == len(tasks)  # each judged once over both runs
    assert stats["in"] == len(tasks)
    assert "shared" in stats["engine"]["teacher_limits"]


def test_shards_on_several_machines_each_take_an_equal_share_of_the_limits(tmp_path: Path) -> None:
    from datagen.teachers.teacher import TeacherConfig

    config = TeacherConfig(requests_per_minute=120, max_concurrency=32, max_cost=10.0)
    share = config.share(4)
    assert (share.requests_per_minute, share.tokens_per_minute, share.max_concurrency, share.max_cost) == \
        (30, None, 8, 2.5)
    assert config.share(1) is config
    loaded = load_config(None, {"filter.passes": ("--passes", ["judge"])})
    loaded.teacher = config
    plan = ScaleFilterPlan(tmp_path / "in.jsonl", tmp_path / "kept.jsonl", tmp_path / "r.jsonl", tmp_path / "w",
                           loaded, tasks=4)
    plan.limit_shares = 4  # what a Slurm run (or Ray on several nodes) sets
    assert plan.spend_file(2).name == "kept.spend.00002.json"
    assert plan.shard_teacher(2).config.max_cost == 2.5
    from datagen.engines.sharded_filter import teacher_limits
    assert teacher_limits(plan)["each_shard"]["requests_per_minute"] == 30
