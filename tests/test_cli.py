"""The CLI as a user meets it: instant help, one-line errors, non-zero exits."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer

from datagen.cli import app
from datagen.records import Instance, Task
from tests.helpers import run_cli, single_error_line

INSTALLED_SCRIPT = Path(sys.executable).parent / "datagen"


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The console script pip installed (not `python -m`): what a user types."""
    return subprocess.run([str(INSTALLED_SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


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


def test_unknown_backend_is_a_usage_error():
    result = run_cli("teacher", "hi", "--backend", "ollama")
    assert result.returncode == 2
    assert single_error_line(result).startswith(
        "error: --backend: Input should be 'local', 'openai', 'openai-batch' or 'vllm'")


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
        "error: --api-key-env: environment variable DATAGEN_TEST_NO_SUCH_KEY is not set "
        "(needed for https://api.example.com/v1)"
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
    assert single_error_line(result).startswith(
        "error: --method: Input should be 'self-instruct', 'alpaca', 'evol-instruct', 'orca', 'preferences', "
        "'magpie' or 'persona'"
    )


# -- bad input: one line, never a traceback ------------------------------------------------------

@pytest.mark.parametrize(("args", "named"), [
    (["generate", "--bogus"], "--bogus"),
    (["finetune", "data.jsonl", "--gpus", "2"], "--gpus"),
    (["generate", "--num", "abc"], "--num"),
    (["export", "kept.jsonl", "--out", "x", "--format"], "--format"),
])
def test_bad_options_are_one_line_from_the_installed_script(args, named):
    result = run_script(*args)
    assert result.returncode == 2, result.stderr
    line = single_error_line(result)
    assert line.startswith("error: ") and named in line
    assert f"(see 'datagen {args[0]} --help')" in line or "(see 'datagen --help')" in line


def test_no_command_shows_the_help():
    result = run_script()
    assert "Traceback" not in result.stderr
    assert "Usage: datagen" in result.stdout + result.stderr


def _option_names(command) -> list[str]:
    return [name for param in command.params for name in (*param.opts, *param.secondary_opts)
            if name.startswith("-")]


@pytest.mark.parametrize("name", [None, "teacher", "generate", "filter", "dedup", "export", "finetune",
                                  "eval", "distill"])
def test_every_option_name_is_readable_in_80_columns(name):
    group = typer.main.get_command(app)
    command = group.commands[name] if name else group
    result = run_script(*([name] if name else []), "--help", env={"COLUMNS": "80", "TERM": "xterm"})
    assert result.returncode == 0, result.stderr
    assert all(len(line) <= 80 for line in result.stdout.splitlines())
    for option in _option_names(command):
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", result.stdout), f"{option} cut:\n{result.stdout}"


def test_seeds_that_are_not_utf8_name_the_line(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_bytes('{"id": "a", "instruction": "Say hi."}\n{"id": "b", "instruction": "Caf\xe9."}\n'
                      .encode("latin-1"))
    result = run_cli("generate", "--seeds", str(seeds), "--out", str(tmp_path / "raw.jsonl"))
    assert result.returncode == 1
    assert single_error_line(result) == f"error: {seeds}:2: not UTF-8 text"


def test_a_config_that_is_not_utf8_names_the_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_bytes("teacher:\n  backend: local\n  model: caf\xe9\n".encode("latin-1"))
    result = run_cli("teacher", "hi", "--config", str(config))
    assert result.returncode == 2
    assert single_error_line(result) == f"error: {config}:3: not UTF-8 text"


def _good_task(task_id: str, instruction: str) -> Task:
    return Task(id=task_id, instruction=instruction,
                instances=[Instance(input="", output="Sleep at the same time every night.")])


def test_filter_and_export_read_a_byte_order_mark_and_refuse_latin1(tmp_path):
    source = tmp_path / "raw.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + (_good_task("a", "Give me three tips for sleeping better.").to_json()
                                            + "\n").encode())
    result = run_cli("filter", str(source), "--out", str(tmp_path / "kept.jsonl"), "--passes", "heuristics")
    assert result.returncode == 0, result.stderr
    assert "kept 1 of 1" in result.stderr
    source.write_bytes(source.read_bytes() + _good_task("b", "Name a caf\xe9.").to_json().encode("latin-1") + b"\n")
    for args in (["filter", str(source), "--out", str(tmp_path / "kept2.jsonl")],
                 ["export", str(source), "--format", "alpaca", "--out", str(tmp_path / "export")]):
        result = run_cli(*args)
        assert result.returncode == 1
        assert single_error_line(result) == f"error: {source}:2: not UTF-8 text"


def test_filter_refuses_two_tasks_under_one_id(tmp_path):
    source = tmp_path / "kept.jsonl"
    lines = [_good_task("x", "Give me three tips for sleeping better."),
             _good_task("y", "Name the capital city of Australia."),
             _good_task("x", "Explain why the sea is salty.")]
    source.write_text("".join(task.to_json() + "\n" for task in lines))
    out = tmp_path / "out.jsonl"
    result = run_cli("filter", str(source), "--out", str(out))
    assert result.returncode == 1
    assert single_error_line(result) == (
        f'error: {source}:3: id "x" already used by line 1 with a different task; fix it or pass --skip-invalid')
    assert not out.exists()
    result = run_cli("filter", str(source), "--out", str(out), "--skip-invalid", "--passes", "heuristics")
    assert result.returncode == 0, result.stderr
    [reject] = [json.loads(line) for line in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert reject["reason"] == "invalid line" and '"x" already used by line 1' in reject["detail"]


def test_missing_api_key_is_said_before_generating(tmp_path, monkeypatch):
    monkeypatch.delenv("DATAGEN_TEST_NO_SUCH_KEY", raising=False)
    result = run_cli("generate", "--backend", "openai", "--base-url", "https://api.example.com/v1",
                     "--api-key-env", "DATAGEN_TEST_NO_SUCH_KEY", "--out", str(tmp_path / "raw.jsonl"),
                     "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 1
    assert single_error_line(result) == (
        "error: --api-key-env: environment variable DATAGEN_TEST_NO_SUCH_KEY is not set "
        "(needed for https://api.example.com/v1)"
    )


# -- output a user can follow in a log ----------------------------------------------------------

# The real `datagen generate` command line, with the teacher swapped for the scripted one of
# the Evol-Instruct tests so it runs in a second.
SCRIPTED_GENERATE = """
import sys
import datagen.teachers.teacher
from datagen.cli import main
from tests.test_evol_instruct import FaultyBackend

datagen.teachers.teacher.make_backend = lambda config: FaultyBackend()
main(sys.argv[1:])
"""


def test_generate_prints_progress_lines_when_not_on_a_terminal(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(
        Task(id=f"s{i}", instruction=f"[ok] Name some rivers of region {i}.",
             instances=[Instance(input="Europe", output="The Rhine.")]).to_json() + "\n" for i in range(4)))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPTED_GENERATE, "generate", "--method", "evol-instruct", "--seeds", str(seeds),
         "--out", str(tmp_path / "evol.jsonl"), "--num", "6", "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
        env={**os.environ, "DATAGEN_PROGRESS_INTERVAL": "0"},
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if re.match(r"evol-instruct: (done )?\d+/6 ", line)]
    teacher = r" \(teacher: \d+ requests, \d+ cached\)"
    assert re.fullmatch(r"evol-instruct: 0/6 \(0%\) 0\.00/s ETA \?" + teacher, lines[0]), lines
    assert any(re.fullmatch(r"evol-instruct: [1-6]/6 \(\d+%\) [\d.]+/s ETA \d\d:\d\d" + teacher, line)
               for line in lines), lines
    assert re.fullmatch(r"evol-instruct: done 6/6 \(100%\) in \d\d:\d\d", lines[-1]), lines


def test_progress_line_says_done_total_rate_and_eta():
    from datagen.progress import PlainProgress

    now = [100.0]
    shown = PlainProgress("generate", total=40, done=4, fields=("loss",), stream=io.StringIO(), interval=30,
                          now=lambda: now[0])
    now[0] += 30
    shown.advance(12, loss="0.41")
    assert shown.line() == "generate: 16/40 (40%) 0.40/s ETA 01:00 loss 0.41"  # 4 were done before
    now[0] += 3600
    assert shown.final_line() == "generate: done 16/40 (40%) in 1:00:30 loss 0.41"


def test_progress_line_shows_what_moves_between_advances():
    from datagen.progress import PlainProgress

    sent = [0]
    shown = PlainProgress("generate", total=6, done=0, fields=(), stream=io.StringIO(), interval=30,
                          now=lambda: 100.0, detail=lambda: f"teacher: {sent[0]} requests")
    sent[0] = 17  # a batch is under way: no task yet, but the teacher is busy
    assert shown.line() == "generate: 0/6 (0%) 0.00/s ETA ? (teacher: 17 requests)"


def test_progress_lines_keep_coming_while_a_stage_waits(monkeypatch):
    from datagen.progress import progress

    monkeypatch.setenv("DATAGEN_PROGRESS_INTERVAL", "0.05")
    log = io.StringIO()
    with progress("judge", total=3, stream=log) as shown:
        time.sleep(0.5)  # a slow teacher batch: nothing advances
        shown.advance(3)
    lines = log.getvalue().splitlines()
    assert lines.count("judge: 0/3 (0%) 0.00/s ETA ?") >= 3
    assert re.fullmatch(r"judge: done 3/3 \(100%\) in 00:0\d", lines[-1])


def test_a_named_key_variable_that_is_unset_is_said_for_a_local_server_too(monkeypatch, capsys):
    from datagen.teachers.openai_api import api_key_for
    from datagen.teachers.teacher import TeacherConfig

    monkeypatch.delenv("DATAGEN_TEST_NO_SUCH_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    local = "http://127.0.0.1:8000/v1"
    assert api_key_for(TeacherConfig(api_key_env="DATAGEN_TEST_NO_SUCH_KEY"), local) == "EMPTY"
    assert capsys.readouterr().err == ("warning: --api-key-env: environment variable DATAGEN_TEST_NO_SUCH_KEY is "
                                       f"not set; {local} is local, so no key is sent\n")
    api_key_for(TeacherConfig(), local)  # the default variable, not named by the user: nothing to say
    assert capsys.readouterr().err == ""


def test_an_unknown_finetune_method_lists_the_methods(tmp_path):
    result = run_cli("finetune", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "out"), "--method", "dora")
    assert result.returncode == 2
    assert single_error_line(result) == "error: --method: expected one of lora, qlora, dpo, got 'dora'"
