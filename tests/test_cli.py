"""The CLI as a user meets it: instant help, one-line errors, non-zero exits."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.helpers import run_cli


def test_help_is_instant_and_imports_nothing_heavy():
    probe = (
        "import sys; from datagen.cli import main\n"
        "try: main(['--help'])\n"
        "except SystemExit: pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'vllm', 'openai', 'datasets') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "teacher" in result.stdout
    assert "HEAVY []" in result.stdout


def single_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_unknown_backend_is_a_usage_error():
    result = run_cli("teacher", "hi", "--backend", "ollama")
    assert result.returncode == 2
    assert single_error_line(result).startswith("error: --backend: Input should be 'local', 'openai' or 'vllm'")


def test_bad_config_key(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("teacher:\n  backend: local\n  temprature: 3\n")
    result = run_cli("teacher", "hi", "--config", str(config))
    assert result.returncode == 2
    assert single_error_line(result) == f"error: {config}: teacher.temprature: unknown key"


def test_missing_api_key(monkeypatch):
    monkeypatch.delenv("DATAGEN_TEST_NO_SUCH_KEY", raising=False)
    result = run_cli("teacher", "hi", "--backend", "openai", "--base-url", "https://api.example.com/v1",
                     "--api-key-env", "DATAGEN_TEST_NO_SUCH_KEY")
    assert result.returncode == 1
    assert single_error_line(result) == (
        "error: the openai backend needs an API key for https://api.example.com/v1: "
        "set the environment variable DATAGEN_TEST_NO_SUCH_KEY"
    )


def test_unreachable_server():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_cli("teacher", "hi", "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}/v1")
    assert result.returncode == 1
    assert single_error_line(result).startswith(f"error: cannot reach the teacher at http://127.0.0.1:{port}/v1")


def test_unknown_local_model():
    result = run_cli("teacher", "hi", "--model", "no-such-model")
    assert result.returncode == 1
    assert single_error_line(result).startswith("error: unknown model 'no-such-model'")


def test_debug_shows_the_traceback():
    result = run_cli("--debug", "teacher", "hi", "--model", "no-such-model")
    assert result.returncode != 0
    assert "Traceback" in result.stderr


@pytest.mark.slow
def test_teacher_smoke_command_on_the_embedded_model():
    result = run_cli("teacher", "What is 2 + 2?", "--max-tokens", "16", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "[local:smollm2-135m] finish=" in result.stderr
    assert "latency" in result.stderr


@pytest.mark.slow
def test_teacher_smoke_command_against_the_server(vllm_server):
    result = run_cli("teacher", "Say hi.", "--backend", "openai", "--base-url", vllm_server,
                     "--model", "smollm2-135m", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "[openai:smollm2-135m]" in result.stderr


@pytest.mark.slow
def test_model_not_served(vllm_server):
    result = run_cli("teacher", "hi", "--backend", "openai", "--base-url", vllm_server, "--model", "gpt-9")
    assert result.returncode == 1
    assert "does not serve model 'gpt-9' (it serves: smollm2-135m)" in single_error_line(result)


def test_missing_seeds_file(tmp_path):
    result = run_cli("generate", "--seeds", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "raw.jsonl"))
    assert result.returncode == 1
    assert single_error_line(result) == f"error: {tmp_path / 'nope.jsonl'}: no such file"
    assert not (tmp_path / "raw.jsonl").exists()


def test_invalid_seeds_file_names_the_line(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"id": "a", "instruction": "Say hi to me."}\n{"id": "b", "instances": []}\n')
    result = run_cli("generate", "--seeds", str(seeds), "--out", str(tmp_path / "raw.jsonl"))
    assert result.returncode == 1
    assert single_error_line(result) == f'error: {seeds}:2: missing "instruction"'


def test_generate_needs_an_output():
    result = run_cli("generate", "--num", "2")
    assert result.returncode == 2
    assert single_error_line(result) == "error: --out: where to write the tasks is required"


def test_unknown_method():
    result = run_cli("generate", "--method", "magic", "--out", "x.jsonl")
    assert result.returncode == 2
    assert single_error_line(result).startswith("error: --method: Input should be 'self-instruct', 'alpaca', 'evol-instruct' or 'orca'")
