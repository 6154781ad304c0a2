"""`engine: ray`: the same records as `engine: local`, on a real local Ray (2 CPUs) and a
2-node localhost cluster; resume after a kill; the HTTP route against a real vLLM server.

The teacher is the deterministic scripted backend of tests.helpers, built inside each Ray
actor by `ScriptedReplicas` (a fault-injection double: the real engines are tested
elsewhere, and vLLM output is not reproducible across batch shapes). Every prompt an actor
answers is appended to a log file, so a test can count requests across processes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")

from datagen.config_file import load_config  # noqa: E402
from datagen.engines.config import ROUTE_ACTORS, ROUTE_HTTP, EngineConfig, ray_route  # noqa: E402
from datagen.engines.ray_teacher import ray_teacher  # noqa: E402
from datagen.errors import ConfigError, TeacherError  # noqa: E402
from datagen.generate import run_generate  # noqa: E402
from datagen.io import read_records, rejects_path  # noqa: E402
from datagen.records import Instance, Task  # noqa: E402
from datagen.teachers.base import Completion  # noqa: E402
from datagen.teachers.cache import RequestCache  # noqa: E402
from datagen.teachers.openai_api import Endpoints  # noqa: E402
from datagen.teachers.teacher import PriceTable, Teacher, TeacherConfig, make_teacher  # noqa: E402
from tests import test_evol_instruct  # noqa: E402
from tests.helpers import ScriptedBackend, alpaca_reply, write_tasks  # noqa: E402

# Ray workers get these modules' functions by value (they need not import tests/)
for _module in (sys.modules[__name__], test_evol_instruct, sys.modules["tests.helpers"]):
    ray.cloudpickle.register_pickle_by_value(_module)


def orca_reply(prompt: str) -> Completion | str:
    """A reply keyed by the instance input "x<task>-<instance>": every instance of tasks
    3, 13, 23... gets no "Final answer:" line (the task is rejected), the second instance of
    tasks 7, 17... is cut off, so a run needs more input than --num."""
    match = re.search(r"Input:\n(.*?)\n\n", prompt, flags=re.S)
    key = match.group(1) if match else "none"
    if "3-" in key:
        return "I would rather not say."
    if key.endswith("7-1"):
        return Completion("Let me think about", "length", 20, 6)
    return f"Because {key} is what it is.\nFinal answer: {key.upper()}"


class ScriptedReplicas:
    """Builds the scripted backend in each actor; logs every prompt it answers to `log`;
    with `fail_after`, an actor raises once it has answered that many (a killed run)."""

    def __init__(self, reply, log: Path, fail_after: int | None = None, delay_s: float = 0.0):
        self.reply, self.log, self.fail_after, self.delay_s = reply, str(log), fail_after, delay_s

    def __call__(self, _config: TeacherConfig) -> ScriptedBackend:
        answered = 0

        def reply(prompt: str):
            nonlocal answered
            if self.fail_after is not None and answered >= self.fail_after:
                raise RuntimeError("replica killed")
            answered += 1
            time.sleep(self.delay_s)
            with open(self.log, "a", encoding="utf-8") as log:
                log.write(prompt.replace("\n", "\\n") + "\n")
            return self.reply(prompt)

        return ScriptedBackend(reply, name="scripted")


def answered(log: Path) -> list[str]:
    return log.read_text(encoding="utf-8").splitlines() if log.exists() else []


def orca_seeds() -> list[Task]:
    return [Task(id=f"t{n}", instruction=f"Task number {n}: repeat the input.",
                 instances=[Instance(input=f"x{n}-{k}", output="") for k in range(2)]) for n in range(40)]


def evol_seeds() -> list[Task]:
    """Every fault of test_evol_instruct, then a second "ok": two survivors a round (the
    first and the last item), so a small --num stops mid-round."""
    return [Task(id=f"seed-{fault}-{k}", instruction=f"[{fault}] Name some rivers ({k}).",
                 instances=[Instance(input="Europe" if fault == "ok" else "", output="The Rhine.")])
            for fault, k in [(fault, 0) for fault in test_evol_instruct.FAULTS] + [("ok", 1)]]


def orca_seeds_with_repeats() -> list[Task]:
    """`orca_seeds` with two tasks asked twice under other ids: t1 in its own batch, t2 many batches later."""
    tasks = orca_seeds()
    tasks.insert(3, tasks[1].model_copy(update={"id": "t1-again"}))
    tasks.insert(30, tasks[2].model_copy(update={"id": "t2-again"}))
    return tasks


def config_for(tmp_path: Path, name: str, method: str, num: int, engine: dict | None = None,
               tasks: list[Task] | None = None, **section):
    tasks = tasks or (orca_seeds() if method == "orca" else evol_seeds())
    seeds = write_tasks(tmp_path / "seeds.jsonl", tasks)
    data = {"teacher": {"cache_dir": str(tmp_path / f"cache-{name}")},
            "generate": {"method": method, "seeds": str(seeds), "out": str(tmp_path / f"{name}.jsonl"), "num": num,
                         "seed": 5, method.replace("-", "_"): section},
            "engine": engine or {}}
    path = tmp_path / f"{name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def run_local(config, reply):
    backend = ScriptedBackend(reply, name="scripted", model=config.teacher.model)
    return run_generate(config, "test", lambda: Teacher(backend, config.teacher))


def run_ray(config, replicas: ScriptedReplicas):
    return run_generate(config, "test", lambda: ray_teacher(config.teacher, config.engine, replicas, name="scripted"))


def outputs(config) -> tuple[bytes, bytes]:
    out = Path(config.generate.out)
    return out.read_bytes(), rejects_path(out).read_bytes()


@pytest.fixture(scope="module")
def _ray_for_this_module():
    yield
    ray.shutdown()


@pytest.fixture
def local_ray(_ray_for_this_module):
    """A local 2-CPU Ray, started by the first test that needs it and shared by the module's
    tests (a start costs seconds); a test that needs another cluster shuts it down first."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if ray.is_initialized() and ray.available_resources().get("CPU", 0) < 2:
        ray.shutdown()  # an actor a failed test left holding a CPU would starve the next test


def restart_ray() -> None:
    """A new local cluster for the rerun after a killed run, as a rerun after a crash gets: an actor
    of the killed pipeline still holding a CPU starved the rerun's pipeline once (a hang in
    Ray Data's executor, Ray logging "Mismatched ActorID: ignoring KillActor")."""
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


ORCA = {"items_per_batch": 8, "check_labels": False}


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [1, 2])
def test_orca_on_ray_writes_the_same_rows_as_local(tmp_path, local_ray, replicas):
    local = config_for(tmp_path, "local", "orca", 25, tasks=orca_seeds_with_repeats(), **ORCA)
    local_summary = run_local(local, orca_reply)
    on_ray = config_for(tmp_path, "ray", "orca", 25, {"kind": "ray", "replicas": replicas, "batch_size": 4},
                        tasks=orca_seeds_with_repeats(), **ORCA)
    log = tmp_path / "answered.log"
    summary = run_ray(on_ray, ScriptedReplicas(orca_reply, log))

    assert outputs(on_ray) == outputs(local)  # tasks and rejects, bit for bit (lineage included)
    # a request asked again (the repeated tasks) is a cache hit on both engines, never sent twice
    assert (summary["requests_sent"], summary["cache_hits"]) == (local_summary["requests_sent"],
                                                                 local_summary["cache_hits"])
    assert local_summary["cache_hits"] >= 2
    assert len(list(read_records(on_ray.generate.out, Task))) == 25
    # one pipeline streamed the plan (25 jobs); the failed tasks' stand-ins went out as the
    # loop asked for them; every request was answered once
    assert summary["engine"]["route"] == ROUTE_ACTORS and summary["engine"]["pipelines"] > 1
    assert len(answered(log)) == len(set(answered(log))) == summary["requests_sent"]


EVOL = {"rounds": 2, "items_per_batch": 2}
EVOL_RAY = {"kind": "ray", "replicas": 2, "batch_size": 3}  # a look-ahead window of 6 items: 3 batches


@pytest.mark.slow
def test_evol_on_ray_writes_the_same_rows_and_rejects_as_local(tmp_path, local_ray):
    # num 3 stops in round 2's first batch: the rejects (batch numbers included) and the stop
    # must be local's, with at most one window (2 batches) answered past it
    local = config_for(tmp_path, "local", "evol-instruct", 3, **EVOL)
    run_local(local, test_evol_instruct.faulty_reply)
    on_ray = config_for(tmp_path, "ray", "evol-instruct", 3, {**EVOL_RAY, "batch_size": 5}, **EVOL)  # window 10
    log = tmp_path / "answered.log"
    summary = run_ray(on_ray, ScriptedReplicas(test_evol_instruct.faulty_reply, log))

    assert len(list(read_records(local.generate.out, Task))) == 3
    assert outputs(on_ray) == outputs(local)
    # round 1's 10 rewrites (the failed one, not cached, again in its batch), then round 2's
    # one window (10 items) where local asked only its first batch (2)
    rewrites = [prompt for prompt in answered(log) if prompt.startswith("You are a prompt")]
    assert len(rewrites) == 10 + 1 + 10 and summary["engine"]["pipelines"] == 3 + 1 + 3


faulty_reply = test_evol_instruct.faulty_reply  # a function, not the module, travels to the actors


def killing_evol_reply(prompt: str) -> Completion:
    """faulty_reply, but the replica dies when asked to answer the second "ok" instruction
    (the last stage of round 1's second look-ahead window)."""
    if "[ok] Name some rivers (1)" in prompt and not prompt.startswith(("You are a prompt", "Here are two")):
        raise RuntimeError("replica killed")
    return faulty_reply(prompt)


@pytest.mark.slow
def test_evol_killed_on_ray_resumes_like_local(tmp_path, local_ray):
    on_ray = config_for(tmp_path, "ray", "evol-instruct", 2, EVOL_RAY, **EVOL)
    with pytest.raises(TeacherError, match="replica killed"):
        run_ray(on_ray, ScriptedReplicas(killing_evol_reply, tmp_path / "killed.log"))
    assert len(list(read_records(on_ray.generate.out, Task))) == 1  # the first window's batches were flushed
    restart_ray()
    log = tmp_path / "answered.log"
    summary = run_ray(on_ray, ScriptedReplicas(test_evol_instruct.faulty_reply, log))
    local = config_for(tmp_path, "local", "evol-instruct", 2, **EVOL)
    run_local(local, test_evol_instruct.faulty_reply)
    assert outputs(on_ray) == outputs(local)
    # the rerun asked again only what failed: the HTTP 500s (not cached) and the killed answer
    again = set(answered(log)) & set(answered(tmp_path / "killed.log"))
    assert summary["cache_hits"] > 0 and again
    assert all("[error]" in prompt or "[ok] Name some rivers (1)" in prompt for prompt in again)


@pytest.mark.slow
def test_killed_run_resumes_without_repeating_finished_shards(tmp_path, local_ray):
    engine = {"kind": "ray", "replicas": 1, "batch_size": 4}
    config = config_for(tmp_path, "ray", "orca", 30, engine, **ORCA)
    log = tmp_path / "answered.log"
    with pytest.raises(TeacherError, match=r"engine: ray: the pipeline failed .*replica killed"):
        run_ray(config, ScriptedReplicas(orca_reply, log, fail_after=30))
    first = answered(log)
    finished = list(read_records(config.generate.out, Task))
    assert 0 < len(finished) < 30
    log.unlink()
    restart_ray()

    run_ray(config, ScriptedReplicas(orca_reply, log))
    again = set(answered(log)) & set(first)
    finished_inputs = {i.input for task in finished for i in task.instances}
    assert not any(f"Input:\\n{text}\\n" in prompt for prompt in again for text in finished_inputs)
    local = config_for(tmp_path, "local", "orca", 30, **ORCA)
    run_local(local, orca_reply)
    assert outputs(config)[0] == outputs(local)[0]


class Killed(Exception):
    """The driver dying mid-run (a KeyboardInterrupt would stop pytest itself)."""


@pytest.mark.slow
def test_replies_that_reached_the_driver_are_cached_before_the_loop_asks(tmp_path, local_ray):
    # the loop is killed at its second batch, after the pipeline streamed back all 60 planned
    # replies (30 tasks x 2 instances) of which the loop had consumed 16: a rerun sends none again
    config = config_for(tmp_path, "ray", "orca", 30, {"kind": "ray", "replicas": 2, "batch_size": 4}, **ORCA)
    log = tmp_path / "answered.log"
    cache_file = Path(config.teacher.cache_dir) / "requests.sqlite"

    def killed_at_second_batch():
        teacher = ray_teacher(config.teacher, config.engine, ScriptedReplicas(orca_reply, log), name="scripted")
        complete, calls = teacher.complete, []

        def complete_then_die(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                deadline = time.monotonic() + 20
                while len(RequestCache(cache_file)) < 60 and time.monotonic() < deadline:
                    time.sleep(0.1)
                raise Killed
            return complete(*args, **kwargs)

        teacher.complete = complete_then_die
        return teacher

    with pytest.raises(Killed):
        run_generate(config, "test", killed_at_second_batch)
    first = answered(log)
    assert len(first) == 60 and len(list(read_records(config.generate.out, Task))) == 7  # t3 failed
    log.unlink()
    restart_ray()

    summary = run_ray(config, ScriptedReplicas(orca_reply, log))
    assert not set(answered(log)) & set(first)
    # keys are the configured teacher's: the loop finds every planned reply but those of the 7
    # tasks flushed before the kill (skipped by id)
    assert summary["cache_hits"] == 60 - 7 * 2
    local = config_for(tmp_path, "local", "orca", 30, **ORCA)
    run_local(local, orca_reply)
    assert outputs(config)[0] == outputs(local)[0]


@pytest.mark.slow
def test_alpaca_on_ray_writes_the_same_rows_and_rejects_as_local(tmp_path, local_ray):
    # 2 prompts a batch; 2 replicas x batch_size 4: a window of 4 batches, one pipeline each
    section = {"prompts_per_batch": 2, "batches_ahead": 1}
    local = config_for(tmp_path, "local", "alpaca", 30, **section)
    local_summary = run_local(local, alpaca_reply)
    on_ray = config_for(tmp_path, "ray", "alpaca", 30, {"kind": "ray", "replicas": 2, "batch_size": 4}, **section)
    log = tmp_path / "answered.log"
    summary = run_ray(on_ray, ScriptedReplicas(alpaca_reply, log))

    assert len(list(read_records(local.generate.out, Task))) == 30
    assert outputs(on_ray) == outputs(local)
    batches = local_summary["requests_sent"] // 2
    assert batches >= 3 and summary["engine"]["pipelines"] == -(-batches // 4)
    assert len(answered(log)) == summary["requests_sent"] == summary["engine"]["pipelines"] * 4 * 2


@pytest.mark.slow
def test_two_node_cluster_writes_the_same_rows(tmp_path):
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the module's local Ray (local_ray), if up, gives way to the cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        on_ray = config_for(tmp_path, "ray", "orca", 12, {"kind": "ray", "replicas": 2, "batch_size": 4}, **ORCA)
        run_ray(on_ray, ScriptedReplicas(orca_reply, tmp_path / "answered.log"))
        ray.shutdown()
    finally:
        cluster.shutdown()
    local = config_for(tmp_path, "local", "orca", 12, **ORCA)
    run_local(local, orca_reply)
    assert outputs(on_ray) == outputs(local)


def test_help_and_config_do_not_import_ray():
    probe = ("import sys; from datagen.cli import main; import datagen.config_file, datagen.generate\n"
             "try: main(['generate', '--help'])\n"
             "except SystemExit: pass\n"
             "print('RAY', 'ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "--estimate" in result.stdout and "RAY False" in result.stdout


def test_ray_is_joined_one_way(monkeypatch):
    """Teacher calls and filter shards join Ray alike: engine.address, else RAY_ADDRESS, else a local Ray."""
    from datagen.engines.ray_cluster import ray_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(None) == ("local", "a Ray started on this machine")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert ray_address(None) == ("ray://head:10001", "RAY_ADDRESS")
    assert ray_address("auto") == ("auto", "engine.address")


def test_engine_section_is_validated_with_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"yaml: engine.replicas: Input should be greater than or equal to 1$"):
        config_for(tmp_path, "x", "orca", 1, {"kind": "ray", "replicas": 0})
    with pytest.raises(ConfigError, match=r"yaml: engine: Value error, replicas is for kind: ray"):
        config_for(tmp_path, "x", "orca", 1, {"replicas": 2})
    with pytest.raises(ConfigError, match=r"engine.kind: ray runs alpaca, evol-instruct, orca, preferences; "
                                          r"self-instruct runs on engine: local only"):
        run_generate(config_for(tmp_path, "x", "self-instruct", 1, {"kind": "ray"}), "test")
    assert ray_route("openai", "http://127.0.0.1:8000/v1") == ROUTE_HTTP
    assert ray_route("openai", ["http://a/v1", "http://b/v1"]) == ROUTE_ACTORS
    assert ray_route("local", None) == ROUTE_ACTORS
    assert EngineConfig().kind == "local"


@pytest.mark.slow
def test_http_route_answers_every_request_once(tmp_path, local_ray, vllm_server):
    # 10 tasks, not orca_seeds()' 40: the plan streams the whole input ahead, and each real reply costs
    config = config_for(tmp_path, "ray", "orca", 6, {"kind": "ray", "replicas": 2, "batch_size": 4},
                        tasks=orca_seeds()[:10], items_per_batch=4, max_instances_per_task=1,
                        answer_sampling={"temperature": 0.0, "max_tokens": 32})
    config.teacher = config.teacher.model_copy(update={"backend": "openai", "base_url": vllm_server,
                                                       "model": "smollm2-135m"})
    summary = run_generate(config, "test")
    assert summary["engine"]["route"] == ROUTE_HTTP
    planned = 6  # the plan covers more of the input than --num (one instance a task) ...
    assert summary["requests_sent"] >= planned and summary["failures"] == 0
    again = run_generate(config, "test")  # ... and a rerun answers from the cache: nothing is sent twice
    assert again["requests_sent"] == 0


class ErrorBodies:
    """An OpenAI-compatible /chat/completions on 127.0.0.1 that answers a request whose
    message holds a marker with that status and the error body a real server sends for it
    (vLLM's 400 context too long, a 403, FastAPI's 404, vLLM's older 500 shape), and any
    other request with a reply; it records every message it is asked."""

    ERRORS = {
        "[too-long]": (400, {"error": {"message": "This model's maximum context length is 2048 tokens.",
                                       "type": "BadRequestError", "param": None, "code": 400}}),
        "[forbidden]": (403, {"error": {"message": "Project does not have access to model",
                                        "type": "invalid_request_error", "code": "model_not_found"}}),
        "[missing]": (404, {"detail": "Not Found"}),
        "[crash]": (500, {"object": "error", "message": "EngineCore encountered an issue",
                          "type": "InternalServerError", "code": 500}),
    }

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from threading import Thread

        self.asked: list[str] = []
        bodies = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                message = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1]["content"]
                bodies.asked.append(message)
                status, body = next((error for marker, error in bodies.ERRORS.items() if marker in message), (200, {
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Fine."},
                                 "finish_reason": "stop"}], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/v1"
        Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_http_route_error_bodies_fail_their_request_not_the_run(tmp_path, local_ray, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = ErrorBodies()
    prompts = [[{"role": "user", "content": f"{marker} Name a river."}] for marker in [*ErrorBodies.ERRORS, "[ok]"]]
    config = TeacherConfig(backend="openai", base_url=server.base_url, model="smollm2-135m", max_retries=0,
                           cache_dir=str(tmp_path / "cache"), sampling={"temperature": 0.0, "max_tokens": 8})
    engine = EngineConfig(kind="ray", replicas=1, batch_size=8)
    try:
        with ray_teacher(config, engine) as teacher:
            *refused, [answer] = teacher.complete(prompts)
            failures = teacher.stats.failures
        with ray_teacher(config, engine) as teacher:
            teacher.complete(prompts)  # a rerun: the failed requests are asked again, the answer is cached
    finally:
        server.close()
    assert answer.ok and answer.text == "Fine." and answer.completion_tokens == 2
    assert [reply.finish_reason for [reply] in refused] == ["error"] * 4 and failures == 4
    assert [reply.error for [reply] in refused] == [
        "HTTP error reply: BadRequestError (400): This model's maximum context length is 2048 tokens.",
        "HTTP error reply: invalid_request_error (model_not_found): Project does not have access to model",
        "HTTP error reply: Not Found",
        "HTTP error reply: InternalServerError (500): EngineCore encountered an issue"]
    first, again = server.asked[:5], server.asked[5:]
    assert sorted(again) == sorted(message for message in first if "[ok]" not in message)


@pytest.mark.gpu
def test_vllm_engine_route_on_gpu(tmp_path, request, embedded_model_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("vllm")
    request.getfixturevalue("local_ray")
    config = config_for(tmp_path, "ray", "orca", 8, {"kind": "ray", "replicas": 1, "batch_size": 8},
                        items_per_batch=8, answer_sampling={"temperature": 0.0, "max_tokens": 64})
    config.teacher = config.teacher.model_copy(update={"backend": "vllm", "model": embedded_model_path})
    summary = run_generate(config, "test")
    assert summary["engine"]["route"].startswith("ray.data.llm vLLMEngine")
    assert summary["failures"] == 0 and summary["requests_sent"] >= 16


# -- iterative methods: several base URLs, balanced by the openai backend ----------------------


def test_least_busy_server_is_picked_and_a_retry_avoids_the_failed_one():
    endpoints = Endpoints(["a", "b", "c"])
    assert endpoints.pick() == 0
    endpoints.in_flight = [2, 1, 1]
    assert endpoints.pick() == 1 and endpoints.pick(avoid=1) == 2
    assert Endpoints(["only"]).pick(avoid=0) == 0  # nowhere else to go
    assert TeacherConfig(base_url="http://a/v1, http://b/v1").base_url == ["http://a/v1", "http://b/v1"]
    assert TeacherConfig(base_url=["http://a/v1"]).base_url == "http://a/v1"


@pytest.mark.slow
def test_requests_spread_over_servers_and_a_failing_one_is_routed_around(vllm_server, tmp_path, monkeypatch):
    from tests.fault_proxy import FaultProxy

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    prompts = [[{"role": "user", "content": f"[down] Name fruit number {n}."}] for n in range(8)]
    # server A fails every request it gets; B answers all: every request completes, on B
    with FaultProxy(vllm_server, {"[down]": ["500"] * 100}) as down, FaultProxy(vllm_server, {"[down]": []}) as up:
        config = TeacherConfig(backend="openai", base_url=[down.base_url, up.base_url], model="smollm2-135m",
                               cache_dir=str(tmp_path / "cache"), max_retries=1, backoff_base_s=0.0,
                               sampling={"temperature": 0.0, "max_tokens": 8})
        with make_teacher(config) as teacher:
            replies = teacher.complete(prompts)
    assert all(reply.ok for [reply] in replies)
    assert down.attempts["[down]"] > 0  # it got its share of first attempts ...
    assert up.delivered["[down]"] == len(prompts) and teacher.stats.retries == down.attempts["[down]"]


# -- --estimate ------------------------------------------------------------------------------


def test_estimate_projects_from_a_pilot_that_the_real_run_reuses(tmp_path):
    from datagen.estimate import format_estimate, run_estimate

    config = config_for(tmp_path, "est", "orca", 30, **ORCA)
    config.teacher = config.teacher.model_copy(
        update={"prices": PriceTable(input_per_million=1.0, output_per_million=2.0)})
    pilot = ScriptedBackend(orca_reply, name="scripted", model=config.teacher.model)
    estimate = run_estimate(config, pilot=5, teacher_factory=lambda: Teacher(pilot, config.teacher))

    # tasks t0..t5 were tried (t3 fails both instances: 2 parse failures + "no instance answered")
    assert len(pilot.seen) == 12 and estimate["pilot_tasks"] == 5
    assert estimate["requests_per_task"] == pytest.approx(12 / 5) and estimate["pilot_rejects"] == 3
    assert estimate["requests"] == 12 * 30 // 5
    prompt_tokens = sum(len(p.split()) for p in pilot.seen) * 30 // 5
    assert estimate["prompt_tokens"] == prompt_tokens and estimate["wall_seconds"] is not None
    assert estimate["cost"] == pytest.approx((prompt_tokens + 2 * estimate["completion_tokens"]) / 1e6)
    assert not Path(config.generate.out).exists()  # the pilot wrote to a scratch file
    assert "assumed: 2.40 requests per accepted task, as in the pilot (3 reject records" in format_estimate(estimate)

    real = ScriptedBackend(orca_reply, name="scripted", model=config.teacher.model)
    summary = run_generate(config, "test", lambda: Teacher(real, config.teacher))
    assert summary["cache_hits"] == 12 and not set(real.seen) & set(pilot.seen)
    assert summary["tasks_produced"] == 30


def test_http_route_stops_the_run_on_a_refused_key():
    from datagen.engines.ray_teacher import http_reply, request_row
    from datagen.teachers.base import Request

    row = request_row(0, "k", Request.build([{"role": "user", "content": "Hi."}], TeacherConfig().sampling))
    body = {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                      "code": "invalid_api_key"}}
    with pytest.raises(TeacherError, match=r"the server refused the run's requests: invalid_request_error "
                                           r"\(invalid_api_key\): Incorrect API key provided"):
        http_reply({**row, "http_response": body})
    other = http_reply({**row, "http_response": {"error": {"message": "too long", "code": 400}}})
    assert other["finish_reason"] == "error" and other["error"] == "HTTP error reply: (400): too long"


def test_http_route_splits_the_request_rate_over_replicas_and_refuses_a_token_rate():
    from datagen.engines.ray_teacher import http_qps

    engine = EngineConfig(kind="ray", replicas=4)
    assert http_qps(TeacherConfig(backend="openai"), engine) is None
    assert http_qps(TeacherConfig(backend="openai", requests_per_minute=600), engine) == 2  # 10 a second over 4
    with pytest.raises(ConfigError, match="below Ray's 1 request a second per replica"):
        http_qps(TeacherConfig(backend="openai", requests_per_minute=120), engine)
    with pytest.raises(ConfigError, match="Ray's HTTP route paces requests only"):
        http_qps(TeacherConfig(backend="openai", tokens_per_minute=10_000), engine)


def test_actors_on_several_nodes_share_the_rate_by_node(capsys):
    from datagen.engines.ray_teacher import replica_teacher

    teacher = TeacherConfig(backend="openai", requests_per_minute=600, tokens_per_minute=90_000, max_concurrency=32)
    assert replica_teacher(teacher, 1) is teacher  # one node: its replicas share the budget file
    assert capsys.readouterr().err == ""
    share = replica_teacher(teacher, 3)
    assert (share.requests_per_minute, share.tokens_per_minute, share.max_concurrency) == (200, 30_000, 10)
    assert "3 nodes cannot share one rate budget; each node's replicas get 1/3 of it" in capsys.readouterr().err
