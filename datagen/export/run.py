"""`datagen export`'s runner: read the tasks, write the chosen format and the dataset card,
remove what a previous export into the same folder wrote and this one does not, and
return (and write as `export.json`) the summary.

    from datagen.export.run import format_export_summary, run_export
    summary = run_export(config, Path("kept.jsonl"), "messages", Path("sft/"))
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from datagen.errors import ConfigError, InputError
from datagen.export.config import ExportConfig
from datagen.export.formats import split_by_task, write_split_files
from datagen.export.hf import write_hf_files
from datagen.export.natural_instructions import write_natural_instructions
from datagen.export.negatives import read_rejects
from datagen.io import atomic_write_json, rejects_path, stats_path, summary_path
from datagen.readers import read_tasks_any

FORMATS = ("natural-instructions", "alpaca", "messages", "prompt-completion", "hf", "preferences")
MANIFEST = "export.json"


def provenance_paths(source: Path) -> dict[str, Any]:
    """Files beside `source` that say how it was made: the filter stats (`kept.stats.json`),
    the generation summary (`raw.summary.json`, of the source itself or of the file the
    filter read) and every rejects file along that chain."""

    stats = stats_path(source)
    upstream = None
    if stats.exists():
        try:
            named = json.loads(stats.read_text(encoding="utf-8")).get("input")
        except (json.JSONDecodeError, AttributeError):
            named = None
        if named:
            upstream = next((p for p in (Path(named), source.parent / Path(named).name) if p.exists()), None)
    summary = summary_path(source)
    if not summary.exists() and upstream is not None:
        summary = summary_path(upstream)
    return {
        "stats": stats,
        "summary": summary,
        "rejects": list(dict.fromkeys([rejects_path(source)] + ([rejects_path(upstream)] if upstream else []))),
    }


def run_export(
    config, source: Path, fmt: str, out_dir: Path, *, strict: bool = False, command_line: str = "",
    input_format: str | None = None, split: str | None = None,
) -> dict[str, Any]:
    """Export the tasks in `source` as `fmt` into `out_dir`, with a dataset card; return the
    summary also written to `out_dir/export.json`. Every file is written atomically; files a
    previous export into `out_dir` wrote that this one does not write are removed."""
    from datagen.export.card import write_card

    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if strict and fmt != "natural-instructions":
        raise ConfigError("--strict: applies to --format natural-instructions only")
    source, out_dir = Path(source), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    if fmt == "preferences":  # pairs, not tasks (datagen.export.preferences)
        from datagen.export.preferences import export_preferences

        fields, written = export_preferences(config, source, out_dir)
        summary = {"format": fmt, "input": str(source), "out": str(out_dir), **fields, "command": command_line}
        summary["files"] = sorted({str(p.relative_to(out_dir)) for p in written} | {MANIFEST})
        _remove_stale(out_dir, summary["files"])
        atomic_write_json(out_dir / MANIFEST, summary)
        return summary
    tasks = read_tasks_any(source, input_format, split)  # any format (datagen.readers)
    seen: set[str] = set()
    for task in tasks:  # one id, two tasks: file names, negatives and row groups would mix them
        if task.id in seen:
            raise InputError(f"{source}: task id {task.id!r} appears more than once; export needs unique ids")
        seen.add(task.id)
    settings: ExportConfig = config.export
    chat = {"prompt_erasure": config.generate.orca.prompt_erasure,
            "generic_system": config.generate.orca.generic_system}
    paths = provenance_paths(source)
    summary: dict[str, Any] = {"format": fmt, "input": str(source), "out": str(out_dir), "tasks": len(tasks),
                               "instances": sum(len(t.instances) for t in tasks), "command": command_line}

    if fmt == "natural-instructions":
        rejects, unreadable = read_rejects(paths["rejects"])
        summary["rejects_read"] = {"files": [str(p) for p in paths["rejects"] if p.exists()],
                                   "records": len(rejects), "unreadable_lines": unreadable[:5]}
        written, splits = write_natural_instructions(config, tasks, out_dir, strict, rejects, summary)
    else:
        splits = split_by_task(tasks, validation=settings.validation, test=settings.test, seed=settings.seed)
        written = (write_hf_files(splits, out_dir, chat) if fmt == "hf"
                   else write_split_files(fmt, splits, out_dir, chat))
    summary["splits"] = {name: {"tasks": len(members), "instances": sum(len(t.instances) for t in members)}
                         for name, members in splits.items()}
    card, plots = write_card(out_dir, fmt=fmt, source=source, splits=splits, provenance=paths,
                             export_config=settings, export_summary=summary, chat=chat)
    written += [card, *plots]
    summary["files"] = sorted({str(p.relative_to(out_dir)) for p in written} | {MANIFEST})
    _remove_stale(out_dir, summary["files"])
    atomic_write_json(out_dir / MANIFEST, summary)
    return summary


def _remove_stale(out_dir: Path, current: list[str]) -> None:
    manifest = out_dir / MANIFEST
    if not manifest.exists():
        return
    try:
        previous = json.loads(manifest.read_text(encoding="utf-8")).get("files", [])
    except (json.JSONDecodeError, AttributeError):
        return
    for name in set(previous) - set(current):
        path = (out_dir / name).resolve()
        if out_dir.resolve() in path.parents:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def format_export_summary(summary: dict[str, Any]) -> str:
    """The closing lines of `datagen export`: counts per split, negatives, strict failures."""
    lines = [f"{summary['format']}: {summary['tasks']} tasks, {summary['instances']} instances from {summary['input']}"]
    lines += [f"  {name:<11}{counts['tasks']:>6} tasks {counts['instances']:>8} instances"
              for name, counts in summary["splits"].items()]
    if "negatives" in summary:
        negatives = summary["negatives"]
        lines.append(f"negative examples: {negatives['from_rejects']} tasks from rejects, "
                     f"{negatives['from_labels']} from another label, {negatives['from_teacher']} from the teacher, "
                     f"{negatives['without']} without")
        lines += [f"  {missing['name']} ({missing['task_id']}): no negative example: {missing['reason']}"
                  for missing in summary.get("negatives_missing", [])]
    if "categories" in summary:
        lines.append("categories: " + ", ".join(f"{name} {count}" for name, count in summary["categories"].items())
                     + " (from " + ", ".join(f"{source} {count}" for source, count
                                             in summary["category_sources"].items()) + ")")
    if summary.get("inputless_left_out"):
        lines.append(f"left out {summary['inputless_left_out']} instances without input from tasks whose "
                     "other instances have one (Natural-Instructions instances need an input)")
    if summary.get("strict"):
        for failure in summary["failures"]:
            lines.append(f"{failure['name']} ({failure['task_id']}) not exported:")
            lines += [f"    {problem}" for problem in failure["problems"]]
        lines.append(f"--strict: {summary['tasks_exported']} of {summary['tasks']} tasks pass")
    elif summary.get("failures"):
        lines.append(f"{len(summary['failures'])} of {summary['tasks']} tasks would fail --strict "
                     f"(reasons in {Path(summary['out']) / MANIFEST} and the card)")
    lines.append(f"wrote {len(summary['files'])} files to {summary['out']} (card: README.md)")
    return "\n".join(lines)
