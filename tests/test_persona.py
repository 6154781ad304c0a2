"""Persona-driven generation (datagen/generators/persona.py): persona files, dedup, prompt
parsing, and one run on the embedded model through the installed `datagen` script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from datagen.errors import InputError
from datagen.generators.persona import (
    bundled_personas_path,
    dedup_personas,
    labelled_text,
    persona_prompt,
    read_lines_or_jsonl,
)

INSTALLED_SCRIPT = Path(sys.executable).parent / "datagen"


def test_near_identical_personas_are_dropped_and_the_first_kept():
    personas = [
        "A beekeeper who sells honey at farmers' markets and worries about varroa mites",
        "a beekeeper who sells honey at farmers markets and worries about varroa mites.",  # case, punctuation
        "A beekeeper who sells honey at the farmers' markets and worries about varroa mites",  # one word more
        "A beekeeper who teaches children about pollinators at a city farm",
        "A paramedic who trains volunteers in first aid for mass events",
    ]
    assert dedup_personas(personas, threshold=0.9) == [personas[0], personas[3], personas[4]]
    # at 1.0 only the same word sets are one persona
    assert dedup_personas(personas, threshold=1.0) == [personas[0], personas[2], personas[3], personas[4]]


def test_the_bundled_personas_are_distinct_and_enough():
    personas = read_lines_or_jsonl(bundled_personas_path(), "persona")
    assert len(personas) >= 30
    assert dedup_personas(personas, threshold=0.5) == personas


def test_persona_files_read_lines_or_jsonl_and_name_the_bad_line(tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text("# our personas\nA carpenter\n\n{\"persona\": \"A baker\"}\n")
    assert read_lines_or_jsonl(lines, "persona") == ["A carpenter", "A baker"]
    lines.write_text("A carpenter\n{\"name\": \"A baker\"}\n")
    with pytest.raises(InputError, match=r"p\.txt:2: no text in field 'persona'"):
        read_lines_or_jsonl(lines, "persona")


def test_the_label_a_chat_model_repeats_is_dropped_and_prompts_name_the_persona():
    assert labelled_text("**Request:** How do I price a walnut table?", "Request") == "How do I price a walnut table?"
    assert labelled_text("How do I price a walnut table?", "Request") == "How do I price a walnut table?"
    [message] = persona_prompt("A carpenter who builds custom furniture", "math")
    assert "A carpenter who builds custom furniture" in message["content"]
    assert message["content"].rstrip().endswith("Problem:")


@pytest.mark.slow
def test_persona_run_on_the_embedded_model_through_the_installed_script_resumes_and_exports(tmp_path, vllm_server):
    """2 personas x 1 kind on the live 135M teacher (behind the shared vLLM server: three local-backend
    processes cost about a minute): each task keeps its persona and kind; a rerun sends nothing (every
    reply from the request cache); export writes both."""
    personas = tmp_path / "personas.txt"
    personas.write_text("A beekeeper who sells honey at farmers' markets\n"
                        "a beekeeper who sells honey at farmers markets.\n"  # a near-duplicate: dropped
                        "A paramedic who trains volunteers in first aid\n")
    out = tmp_path / "raw.jsonl"
    env = {**os.environ, "DATAGEN_CACHE_DIR": str(tmp_path / "cache")}
    config = tmp_path / "persona.yaml"
    config.write_text(f"teacher:\n  backend: openai\n  base_url: {vllm_server}\n  model: smollm2-135m\n"
                      f"generate:\n  method: persona\n  num: 2\n  persona:\n    personas: {personas}\n"
                      "    prompt_sampling: {temperature: 0.7, max_tokens: 40, seed: 0}\n"
                      "    answer_sampling: {temperature: 0.0, max_tokens: 24}\n")
    command = [str(INSTALLED_SCRIPT), "generate", "-c", str(config), "--out", str(out)]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    tasks = [json.loads(line) for line in out.read_text().splitlines()]
    rejects = [json.loads(line) for line in out.with_name("raw.rejects.jsonl").read_text().splitlines()]
    # a cut-off prompt or answer (tiny max_tokens) is a reject; each of the two items is one or the other
    assert len(tasks) + len(rejects) == 2
    assert {t["lineage"]["persona"] for t in tasks} <= {"A beekeeper who sells honey at farmers' markets",
                                                        "A paramedic who trains volunteers in first aid"}
    assert all(t["lineage"]["persona_kind"] == "instruction" and t["lineage"]["generator"] == "persona"
               for t in tasks)
    assert all(r["stage"] == "persona" for r in rejects)
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    summary = json.loads(out.with_name("raw.summary.json").read_text())
    assert summary["requests_sent"] == 0
    assert out.read_text().count("\n") == len(tasks)
    if tasks:
        exported = subprocess.run([str(INSTALLED_SCRIPT), "export", str(out), "--format", "messages",
                                   "--out", str(tmp_path / "dataset")], env=env, capture_output=True, text=True,
                                  timeout=300)
        assert exported.returncode == 0, exported.stderr
