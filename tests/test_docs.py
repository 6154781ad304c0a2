"""The docs cannot rot quietly: every `datagen` command line shown in README.md and docs/*.md
must name real subcommands and real flags, and the site must build with `mkdocs build --strict`
(a broken link or anchor, a page missing from nav). `make test` builds the site too, before the
suite; the build here makes `make test-fast` catch the same."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][A-Za-z0-9-]*)")


def command_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, command) for every `datagen ...` line inside a fenced code block of PATH,
    a `$ ` prompt and leading VAR=value assignments dropped, `\\` continuations joined."""
    found: list[tuple[int, str]] = []
    in_code = False
    pending: tuple[int, str] | None = None
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(raw):
            in_code = not in_code
            pending = None
            continue
        if not in_code:
            continue
        line = raw.strip()
        if pending is not None:
            start, text = pending
            text += " " + line.removesuffix("\\").strip()
            pending = (start, text) if line.endswith("\\") else None
            if pending is None:
                found.append((start, text))
            continue
        line = line.removeprefix("$ ")
        words = line.split()
        while words and ENV_ASSIGNMENT.match(words[0]):
            words.pop(0)
        if not words or words[0] != "datagen":
            continue
        text = " ".join(words)
        if text.endswith("\\"):
            pending = (number, text.removesuffix("\\").strip())
        else:
            found.append((number, text))
    return found


def all_commands() -> list[tuple[str, int, str]]:
    return [(path.name, number, text) for path in DOC_FILES for number, text in command_lines(path)]


@cache
def help_text(*path: str) -> str:
    result = run_cli(*path, "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0, f"datagen {' '.join(path)} --help failed:\n{result.stdout}{result.stderr}"
    return result.stdout


def subcommands(help_output: str) -> set[str]:
    """The names listed under `Commands:` in a help text (empty for a leaf command)."""
    names: set[str] = set()
    listing = False
    for line in help_output.splitlines():
        if line.strip() == "Commands:":
            listing = True
        elif listing and line.startswith("  ") and line.strip():
            names.add(line.split()[0])
        elif listing and line.strip() and not line.startswith(" "):
            listing = False
    return names


def split_command(text: str) -> tuple[tuple[str, ...], list[str]]:
    """(subcommand path, --flags used) of one documented `datagen ...` line."""
    words = shlex.split(text, comments=True)[1:]
    path: list[str] = []
    while words and words[0] in subcommands(help_text(*path)):
        path.append(words.pop(0))
    flags = [match.split("=")[0] for word in words for match in FLAG.findall(word)]
    return tuple(path), flags


def test_the_docs_show_datagen_commands():
    commands = all_commands()
    shown = {split_command(text)[0] for _, _, text in commands}
    # generate, filter, dedup, export, finetune, eval, distill, view and teacher all appear
    assert len(commands) > 40 and len(shown) >= 9, shown


def test_a_continued_line_is_joined_and_a_renamed_flag_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\n"
        "$ datagen generate --num 5 \\\n"
        "    --out raw.jsonl   # --not-a-flag in a comment\n"
        "RAY_ADDRESS=auto datagen dedup raw.jsonl --out kept.jsonl --tasks 2\n"
        "```\n"
        "datagen filter --outside-code-blocks\n",
        encoding="utf-8",
    )
    assert command_lines(page) == [
        (2, "datagen generate --num 5 --out raw.jsonl   # --not-a-flag in a comment"),
        (4, "datagen dedup raw.jsonl --out kept.jsonl --tasks 2"),
    ]
    assert split_command(command_lines(page)[0][1]) == (("generate",), ["--num", "--out"])
    assert missing_flags("datagen finetune data --nproc 2") == []
    assert missing_flags("datagen finetune data --gpus 2") == ["--gpus"]


def missing_flags(text: str) -> list[str]:
    path, flags = split_command(text)
    assert path, f"no datagen subcommand in: {text}"
    output = help_text(*path)
    return [flag for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", output)]


@pytest.mark.parametrize(("page", "line", "command"), all_commands(), ids=lambda value: str(value)[:60])
def test_every_flag_in_the_docs_is_in_the_commands_help(page, line, command):
    missing = missing_flags(command)
    assert not missing, f"{page}:{line}: `{command}` uses {missing}, which `--help` does not list"


def test_the_readme_links_resolve():
    """README.md is outside the mkdocs site, so its links are checked here: every relative link
    names a file that exists and, for a docs page, a heading that is there."""
    from markdown.extensions.toc import slugify

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert any(link.startswith("docs/") for link in links)
    broken = []
    for link in links:
        if re.match(r"^[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        path = ROOT / target if target else ROOT / "README.md"
        if not path.exists():
            broken.append(f"{link}: no such file")
        elif anchor and path.suffix == ".md":
            headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
            if anchor not in {slugify(re.sub(r"[`*]", "", heading), "-") for heading in headings}:
                broken.append(f"{link}: no such heading")
    assert not broken, broken


def test_the_site_builds_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
