"""`engine: ray` for export: the teacher calls of a Natural-Instructions export (category
picks, negative examples) go through Ray Data, with the files, the card and the summary of
`engine: local`, the same request cache, and Ray started only when a teacher call is needed.

The teacher is a deterministic scripted backend (tests.helpers.ScriptedBackend, a
fault-injection double: the real engines are tested elsewhere) put in place of
`make_backend`, in the driver for `engine: local` and inside each Ray actor for
`engine: ray`. Each prompt it answers is logged with the answering process id, so a test
sees which process answered and counts requests across processes.
"""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # every test here starts Ray

from datagen.config_file import load_config  # noqa: E402
from datagen.engines.config import ROUTE_ACTORS  # noqa: E402
from datagen.export import run_export  # noqa: E402
from datagen.io import rejects_path, write_jsonl_atomic  # noqa: E402
from datagen.records import Instance, Reject, Task  # noqa: E402
from datagen.teachers.teacher import TeacherConfig  # noqa: E402
from tests.helpers import ScriptedBackend  # noqa: E402

# Ray workers get these modules' functions by value (they need not import tests/)
for _module in (sys.modules[__name__], sys.modules["tests.helpers"]):
    ray.cloudpickle.register_pickle_by_value(_module)


def scripted_reply(prompt: str) -> str:
    """Category picks: a listed name for even task numbers, an unlisted one (the rules
    decide) for odd. Negatives: odd tasks get nothing usable on the first try (example
    "The number is 0."), so the export asks a second round."""
    number = int(re.search(r"style (\d+)", prompt).group(1))
    if prompt.startswith("Choose the category"):
        return "Category: Misc." if number % 2 == 0 else "Number Words"
    shown = re.findall(r"\nInput: (.*)\n", prompt)[-1]
    if shown == "The number is 0." and number % 2:
        return "I am not sure what you mean."
    return f"Wrong answer: {number + 100}\nWhy it is wrong: it is not the number in {shown!r}."


class ScriptedTeacher:
    """`make_backend` for the test: the scripted backend under the configured backend name
    and model (so cache keys are the configured teacher's), logging "pid<TAB>prompt"."""

    def __init__(self, log: Path):
        self.log = str(log)

    def __call__(self, config: TeacherConfig) -> ScriptedBackend:
        def reply(prompt: str) -> str:
            with open(self.log, "a", encoding="utf-8") as log:
                log.write(f"{os.getpid()}\t{prompt.splitlines()[0]}\n")
            return scripted_reply(prompt)

        return ScriptedBackend(reply, name=config.backend, model=config.model)


def answered_by(log: Path) -> list[int]:
    """The process id that answered each request so far."""
    return [int(line.split("\t")[0]) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def scripted(tmp_path) -> Path:
    """The scripted teacher in place of every real backend; returns its log."""
    with scripted_teacher(tmp_path / "answered.log"):
        yield tmp_path / "answered.log"


@contextmanager
def scripted_teacher(log: Path):
    factory = ScriptedTeacher(log)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("datagen.teachers.teacher.make_backend", factory)  # engine: local
        patch.setattr("datagen.engines.ray_teacher.make_backend", factory)  # engine: ray (sent to each actor)
        assert not ray.is_initialized()
        try:
            yield patch
        finally:
            if ray.is_initialized():  # a failed test must not leave Ray up for the next one
                ray.shutdown()


def number_tasks(count: int = 4) -> list[Task]:
    """Tasks without a label to show: negatives and categories need the teacher."""
    return [Task(id=f"words-{k}", name=f"number_words_{k}", instruction=f"Write the number in words, style {k}.",
                 instances=[Instance(input=f"The number is {i}.", output=f"number {i} in words") for i in range(30)])
            for k in range(count)]


def sentiment_tasks(count: int = 3) -> list[Task]:
    """Classification tasks: another label is their negative example, the rules their category."""
    return [Task(id=f"sentiment-{k}", name=f"review_sentiment_{k}",
                 instruction=f"Classify the sentiment of reviews in style {k} as positive or negative.",
                 instances=[Instance(input=f"Review {i}: " + ("loved it." if i % 2 else "hated it."),
                                     output="positive" if i % 2 else "negative") for i in range(30)],
                 is_classification=True) for k in range(count)]


def source_file(tmp_path: Path, tasks: list[Task]) -> Path:
    """Tasks, and for the first one a rejected output (its negative comes from the rejects)."""
    path = tmp_path / "raw.jsonl"
    write_jsonl_atomic(path, tasks)
    rejected = Instance(input="The number is 3.", output="thirty")
    write_jsonl_atomic(rejects_path(path), [Reject(reason="instance: wrong number", stage="instances",
                                                   raw=rejected.model_dump_json(), detail=tasks[0].instruction)])
    return path


def settings(cache: Path, replicas: int, **export):
    """Defaults but the cache, the export options, and with `replicas` > 0 engine: ray."""
    overrides = {"teacher.cache_dir": ("--cache-dir", str(cache))}
    overrides.update({f"export.{key}": (f"--{key}", value) for key, value in export.items()})
    if replicas:
        overrides.update({"engine.kind": ("--engine", "ray"), "engine.replicas": ("--replicas", replicas),
                          "engine.batch_size": ("--batch-size", 2)})
    return load_config(None, overrides)


def export(folder: Path, source: Path, name: str, cache: str, replicas: int, **options) -> dict:
    """Export `source` into folder/name with the request cache folder/cache; 0 replicas: engine: local."""
    return run_export(settings(folder / cache, replicas, **options), source, "natural-instructions", folder / name,
                      command_line="datagen export")


def written(out: Path) -> dict[str, bytes]:
    return {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}


def same_summary(summary: dict) -> dict:
    """The summary without what names the run (its folder) or the engine it ran on."""
    teacher = {k: v for k, v in summary.get("negative_teacher", {}).items() if k != "engine"}
    return {**summary, "out": None, "negative_teacher": teacher}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    """One export on engine: local and one on engine: ray (2 replicas), each with its own
    cache: (folder, source, local summary, Ray summary). Ray is not up before or after."""
    folder = tmp_path_factory.mktemp("exported")
    source = source_file(folder, number_tasks())
    with scripted_teacher(folder / "answered.log"):
        local = export(folder, source, "local", "cache-local", 0, category_from_teacher=True)
        asked_locally = len(answered_by(folder / "answered.log"))
        on_ray = export(folder, source, "ray", "cache-ray", 2, category_from_teacher=True)
        assert not ray.is_initialized()  # the export started Ray for its teacher and shut it down
    served = answered_by(folder / "answered.log")[asked_locally:]
    assert served and os.getpid() not in served and len(served) == asked_locally == 4 + 3 + 2
    return folder, source, local, on_ray


def test_export_on_ray_writes_the_same_files_as_local_one_pipeline_a_round(exported):
    folder, _source, local, on_ray = exported
    local_files, ray_files = written(folder / "local"), written(folder / "ray")
    assert sorted(local_files) == sorted(ray_files)
    for name in local_files:
        if name != "export.json":
            assert ray_files[name] == local_files[name], name
    assert same_summary(json.loads(ray_files["export.json"])) == same_summary(json.loads(local_files["export.json"]))
    assert local["negatives"] == {"from_rejects": 1, "from_labels": 0, "from_teacher": 3, "without": 0}
    assert local["category_sources"] == {"teacher": 2, "rules": 2}
    assert "engine" not in local["negative_teacher"]
    # the category picks, then the two rounds of negatives: one pipeline each, not one per task
    assert on_ray["negative_teacher"]["engine"] == {"kind": "ray", "route": ROUTE_ACTORS, "replicas": 2,
                                                    "pipelines": 3}
    assert on_ray["negative_teacher"]["requests_sent"] == 9


def test_a_second_export_on_ray_is_all_cache_hits_and_either_engine_serves_the_other(exported, monkeypatch):
    folder, source, _local, _on_ray = exported
    starts = []
    real_init = ray.init
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: starts.append(kwargs) or real_init(*args, **kwargs))
    log = folder / "answered.log"
    sent = len(answered_by(log))
    with scripted_teacher(log):
        again = export(folder, source, "again", "cache-ray", 2, category_from_teacher=True)
        local_from_ray = export(folder, source, "local-from-ray", "cache-ray", 0, category_from_teacher=True)
        ray_from_local = export(folder, source, "ray-from-local", "cache-local", 2, category_from_teacher=True)

    assert len(answered_by(log)) == sent and starts == []  # nothing asked: no pipeline, Ray not even started
    for summary in (again, local_from_ray, ray_from_local):
        assert summary["negative_teacher"]["requests_sent"] == 0
        assert summary["negative_teacher"]["cache_hits"] == 4 + 3 + 2
    assert again["negative_teacher"]["engine"]["pipelines"] == ray_from_local["negative_teacher"]["engine"][
        "pipelines"] == 0
    for name in ("again", "local-from-ray", "ray-from-local"):
        assert written(folder / name)["tasks/task002_number_words_1.json"] == \
            written(folder / "local")["tasks/task002_number_words_1.json"]


def test_ray_starts_only_for_an_export_that_asks_the_teacher(tmp_path, scripted):
    source = source_file(tmp_path, sentiment_tasks())
    without = export(tmp_path, source, "rules", "cache", 1)
    assert not ray.is_initialized() and not scripted.exists()
    assert "negative_teacher" not in without and without["negatives"]["from_labels"] == 2

    picked = export(tmp_path, source, "picked", "cache", 1, category_from_teacher=True)
    assert not ray.is_initialized()  # started for the category picks, shut down after
    served = answered_by(scripted)
    assert len(served) == 3 and os.getpid() not in served
    assert picked["negative_teacher"]["engine"]["pipelines"] == 1
