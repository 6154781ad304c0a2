"""Real replies of the embedded model, recorded once and replayed, so the long generator loops
run on real teacher text without paying for the model in every suite.

A recording is a file of (request key -> reply) in tests/data/recorded/NAME.jsonl, keyed exactly
as the request cache keys requests. `RecordedBackend` is a `local` backend that answers from it:
the teacher, its cache, the generator loop, resume and the CLI all run as they do on the live
model, on the replies the live model gave to these exact requests. A request that is not in the
recording (a prompt, template or sampling setting changed) fails the test and says how to
re-record; it never falls back to something made up.

    def test_something(recorded, monkeypatch):
        recording = recorded("name")
        recording.install(monkeypatch)        # every `backend: local` teacher answers from it
        teacher = recording.teacher(config)   # or one Teacher, built directly

Record (DATAGEN_RECORD=1): the live embedded model answers and the file is written when the test
ends. Re-record after changing what the teacher is asked, then commit the file:

    DATAGEN_RECORD=1 .venv/bin/python -m pytest tests/test_self_instruct.py -k later_rounds
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from datagen.teachers.base import BackendCounters, Completion, Request, ResultCallback
from datagen.teachers.cache import request_key

RECORDINGS = Path(__file__).parent / "data" / "recorded"
RECORD_COMMAND = "DATAGEN_RECORD=1 .venv/bin/python -m pytest"


def recording_now() -> bool:
    return os.environ.get("DATAGEN_RECORD") == "1"


class Recording:
    """One test's recorded replies: read from its file, or (recording) appended to it as they come."""

    def __init__(self, name: str, nodeid: str, live: bool, fresh: bool = True):
        self.name, self.nodeid, self.live = name, nodeid, live
        self.replies: dict[str, Completion] = {}
        if live:
            if fresh:
                RECORDINGS.mkdir(parents=True, exist_ok=True)
                self.file.write_text("", encoding="utf-8")
            return
        if not self.file.exists():
            pytest.fail(f"{self.file}: no recording; make it with {RECORD_COMMAND} '{nodeid}'", pytrace=False)
        for line in self.file.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            self.replies[row["key"]] = Completion(row["text"], row["finish_reason"], row["prompt_tokens"],
                                                  row["completion_tokens"])

    @property
    def file(self) -> Path:
        return RECORDINGS / f"{self.name}.jsonl"

    def backend(self, config, hang_when: Path | None = None) -> RecordedBackend:
        return RecordedBackend(self, config, hang_when)

    def teacher(self, config):
        from datagen.teachers.teacher import Teacher

        return Teacher(self.backend(config), config)

    def install(self, monkeypatch) -> None:
        """Every teacher built from a config with `backend: local` answers from this recording."""
        from datagen.teachers.teacher import BACKENDS

        monkeypatch.setitem(BACKENDS, "local", self.backend)

    def keep(self, key: str, reply: Completion) -> None:
        """Record one live reply at once (a process killed mid-run keeps what it was answered)."""
        row = {"key": key, "text": reply.text, "finish_reason": reply.finish_reason,
               "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens}
        with self.file.open("a", encoding="utf-8") as out:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")

    def save(self) -> None:
        """Sort the recorded replies by key, once each (a stable file to diff and commit)."""
        if not self.live:
            return
        rows = {json.loads(line)["key"]: line for line in self.file.read_text(encoding="utf-8").splitlines()}
        self.file.write_text("".join(rows[key] + "\n" for key in sorted(rows)), encoding="utf-8")


def hung_marker(hang_when: Path) -> Path:
    """The file a hanging `RecordedBackend` creates: the run is blocked in a request."""
    return hang_when.with_name(hang_when.name + ".hung")


class RecordedBackend:
    """The `local` backend as the recording saw it: the live model's replies, looked up by request key.

    `hang_when`: once that file has content, the next request never comes back (a teacher that
    hangs) and `hung_marker(hang_when)` appears, so a test can SIGKILL the run at a known point
    instead of after a guessed sleep."""

    name = "local"

    def __init__(self, recording: Recording, config, hang_when: Path | None = None):
        self.recording = recording
        self.model = config.model
        self.hang_when = hang_when
        self.counters = BackendCounters()
        self.live = None
        if recording.live:
            from datagen.teachers.local import LocalBackend

            self.live = LocalBackend(config)
            self.counters = self.live.counters

    def _key(self, request: Request) -> str:
        return request_key(self.name, self.model, request)

    def generate(self, requests: Sequence[Request], on_result: ResultCallback) -> None:
        if self.hang_when is not None and self.hang_when.exists() and self.hang_when.stat().st_size:
            hung_marker(self.hang_when).touch()  # what the test waits for before it kills
            threading.Event().wait()
        if self.live is not None:
            def keep(index: int, completion: Completion) -> None:
                if completion.ok:
                    self.recording.keep(self._key(requests[index]), completion)
                on_result(index, completion)

            self.live.generate(requests, keep)
            return
        for index, request in enumerate(requests):
            reply = self.recording.replies.get(self._key(request))
            if reply is None:
                pytest.fail(f"{self.recording.file}: no reply recorded for {request.messages[-1][1][-160:]!r}: "
                            f"what the teacher is asked changed; re-record with "
                            f"{RECORD_COMMAND} '{self.recording.nodeid}'", pytrace=False)
            on_result(index, reply)

    def close(self) -> None:
        if self.live is not None:
            self.live.close()


def main(argv: list[str]) -> None:
    """`python -m tests.recorded NAME [--hang-when PATH] -- DATAGEN ARGS`: the `datagen` command line
    in a fresh process, its `backend: local` teachers answering from recording NAME (recording
    into it, appending, under DATAGEN_RECORD=1)."""
    from datagen.cli import main as datagen
    from datagen.teachers.teacher import BACKENDS

    name, rest = argv[0], argv[1:]
    hang_when = None
    if rest[:1] == ["--hang-when"]:
        hang_when, rest = Path(rest[1]), rest[2:]
    assert rest[:1] == ["--"], "usage: python -m tests.recorded NAME [--hang-when PATH] -- DATAGEN ARGS"
    # the test that started this process, for the re-record hint
    nodeid = os.environ.get("PYTEST_CURRENT_TEST", name).rsplit(" ", 1)[0]
    recording = Recording(name, nodeid, recording_now(), fresh=False)
    BACKENDS["local"] = lambda config: recording.backend(config, hang_when)
    datagen(rest[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
