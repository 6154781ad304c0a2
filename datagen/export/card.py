"""The dataset card `datagen export` writes beside the data (`OUT/README.md`, plots in `OUT/card/`).

It says what is in the export and how it was made, from the records themselves and from
the run files beside the input:

- counts per split, and tasks per method (lineage generator), operation and round;
- length distributions (words) of instructions, inputs and outputs;
- the filter passes (`KEPT.stats.json`): in/out and reasons per pass;
- the teacher, its sampling parameters, tokens and cost (`RAW.summary.json` and lineage);
- the exact commands and configs of generation, filtering and export.

A run file that is missing is named as missing; no number is made up. Plots are PNGs drawn
with matplotlib's Agg renderer (no display, no pyplot global state).

    from datagen.export.card import card_facts, card_markdown
    facts = card_facts(splits, generation=summary, filter_stats=stats, ...)
    text = card_markdown(facts, plots={"lengths": "card/lengths.png"})
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from datagen.io import atomic_write_text, write_file_atomic
from datagen.records import Task

PLOTS = ("breakdown", "lengths", "filter")


def read_json_if_there(path: Path | None) -> dict[str, Any] | None:
    """A run file's JSON object (a summary, stats), or None when there is none or it is not JSON."""
    if path is None or not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _word_count(text: str) -> int:
    return len(text.split())


def _spread(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "mean": round(statistics.fmean(values), 1),
            "max": max(values)}


def card_facts(
    splits: dict[str, list[Task]],
    *,
    fmt: str,
    source: str,
    generation: dict[str, Any] | None,
    generation_path: str,
    filter_stats: dict[str, Any] | None,
    filter_path: str,
    export_summary: dict[str, Any],
    export_config: dict[str, Any],
    chat: dict[str, Any],
) -> dict[str, Any]:
    """Everything the card shows, as plain data (no files touched)."""
    tasks = [task for members in splits.values() for task in members]
    instances = [instance for task in tasks for instance in task.instances]
    lineages = [task.lineage for task in tasks if task.lineage is not None]
    teachers = Counter(f"{lineage.teacher_backend}:{lineage.teacher_model}"
                       for lineage in lineages if lineage.teacher_model)
    sampling = Counter(json.dumps(lineage.sampling, sort_keys=True) for lineage in lineages if lineage.sampling)
    return {
        "format": fmt,
        "source": source,
        "splits": {name: {"tasks": len(members), "instances": sum(len(t.instances) for t in members)}
                   for name, members in splits.items()},
        "tasks": len(tasks),
        "instances": len(instances),
        "classification_tasks": sum(t.is_classification for t in tasks),
        "tasks_without_instances": sum(not t.instances for t in tasks),
        "instances_with_explanation": sum(bool(i.explanation) for i in instances),
        "orca_tasks": sum(t.system is not None for t in tasks),
        "breakdown": {
            "method": dict(Counter((t.lineage.generator if t.lineage else None) or "unknown"
                                   for t in tasks).most_common()),
            "operation": dict(Counter((t.lineage.operation if t.lineage else None) or "-"
                                      for t in tasks).most_common()),
            "round": dict(sorted(Counter(str(t.lineage.round) if t.lineage and t.lineage.round is not None else "-"
                                         for t in tasks).items())),
        },
        "lengths": {
            "instruction": [_word_count(t.instruction) for t in tasks],
            "input": [_word_count(i.input) for i in instances],
            "output": [_word_count(i.output) for i in instances],
        },
        "teachers": dict(teachers.most_common()),
        "sampling": {key: count for key, count in sampling.most_common()},
        "lineage_tokens": {"prompt": sum(lineage.usage.prompt_tokens for lineage in lineages),
                           "completion": sum(lineage.usage.completion_tokens for lineage in lineages)},
        "generation": generation,
        "generation_path": generation_path,
        "filter": filter_stats,
        "filter_path": filter_path,
        "export": export_summary,
        "export_config": export_config,
        "chat": chat,
    }


def write_plots(facts: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Draw the card's PNGs into `folder` (each written atomically); name -> path. The filter
    plot is drawn only when there are filter statistics."""
    from matplotlib.figure import Figure


    def save(name: str, figure: Figure) -> Path:
        path = folder / f"{name}.png"
        figure.tight_layout()
        write_file_atomic(path, lambda temp: figure.savefig(temp, format="png", dpi=100, metadata={"Software": None}))
        return path

    plots = {}
    breakdown = facts["breakdown"]
    figure = Figure(figsize=(12, 3.8))
    for axis, (title, counts) in zip(figure.subplots(1, 3), breakdown.items()):
        labels = list(counts)[:12]
        axis.barh(labels[::-1], [counts[label] for label in labels][::-1], color="#4c72b0")
        axis.set_title(f"tasks per {title}")
        axis.set_xlabel("tasks")
    plots["breakdown"] = save("breakdown", figure)

    figure = Figure(figsize=(12, 3.5))
    for axis, (field, values) in zip(figure.subplots(1, 3), facts["lengths"].items()):
        axis.hist(values or [0], bins=min(30, max(5, len(set(values)))), color="#55a868")
        axis.set_title(f"{field} length")
        axis.set_xlabel("words")
        axis.set_ylabel("tasks" if field == "instruction" else "instances")
    plots["lengths"] = save("lengths", figure)

    stats = facts["filter"]
    if stats and stats.get("passes"):
        passes = stats["passes"]
        figure = Figure(figsize=(12, 4))
        left, right = figure.subplots(1, 2)
        names = [entry["pass"] for entry in passes]
        positions = range(len(names))
        left.bar([p - 0.2 for p in positions], [entry["in"] for entry in passes], width=0.4,
                 label="in", color="#8172b2")
        left.bar([p + 0.2 for p in positions], [entry["out"] for entry in passes], width=0.4,
                 label="out", color="#4c72b0")
        left.set_xticks(list(positions), names, rotation=20)
        left.set_ylabel("tasks")
        left.set_ylim(0, max(entry["in"] for entry in passes) * 1.25 + 1)  # room for the legend
        left.set_title("tasks in / out per filter pass")
        left.legend(loc="upper right")
        reasons = Counter()
        for entry in passes:
            for reason, count in entry["reasons"].items():
                reasons[f"{entry['pass']}: {reason}"[:50]] += count
        right.set_title("rejected tasks per reason")
        if reasons:
            top = reasons.most_common(10)[::-1]
            right.barh([label for label, _c in top], [count for _l, count in top], color="#c44e52")
            right.set_xlabel("tasks")
        else:
            right.set_axis_off()
            right.text(0.5, 0.5, "no task was rejected", ha="center", va="center", transform=right.transAxes)
        plots["filter"] = save("filter", figure)
    return plots


def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table's lines (the dataset cards' tables)."""
    def cell(value: Any) -> str:  # a "|" or a line break inside a cell would break the table
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]


def _yaml(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, sort_keys=False, allow_unicode=True, width=100).rstrip()


def card_markdown(facts: dict[str, Any], plots: dict[str, str], front_matter: str | None = None) -> str:
    """The card's Markdown; `plots` maps plot names to paths relative to the card."""
    lines = [f"---\n{front_matter.rstrip()}\n---\n"] if front_matter else []
    lines += [f"# Dataset card: {Path(facts['source']).name} ({facts['format']})", "",
              f"Synthetic instruction data made with datagen from `{facts['source']}`, "
              f"exported as `{facts['format']}`. Splits are by task: no task has instances in two splits.", "",
              "## Contents", ""]
    lines += markdown_table(["split", "tasks", "instances"],
                            [[name, c["tasks"], c["instances"]] for name, c in facts["splits"].items()]
                            + [["**all**", facts["tasks"], facts["instances"]]])
    lines += ["", f"Classification tasks: {facts['classification_tasks']}. Orca tasks (with a system message): "
              f"{facts['orca_tasks']}. Instances with an explanation: {facts['instances_with_explanation']}. "
              f"Tasks without instances: {facts['tasks_without_instances']}."]
    export = facts["export"]
    if export.get("failures"):
        verdict = "left out by --strict" if export.get("strict") else "that would fail --strict"
        lines += ["", f"Tasks {verdict} ({len(export['failures'])}):", ""]
        lines += [f"- `{f['name']}`: " + "; ".join(f["problems"]) for f in export["failures"]]
    if "negatives" in export:
        negatives = export["negatives"]
        lines += ["", f"Negative examples: {negatives['from_rejects']} tasks from rejected outputs, "
                  f"{negatives['from_labels']} from another label of the task, "
                  f"{negatives['from_teacher']} from the teacher, {negatives['without']} without."]
        lines += [f"- `{m['name']}`: no negative example: {m['reason']}" for m in export.get("negatives_missing", [])]
    if "categories" in export:
        lines += ["", "Natural-Instructions categories: " + ", ".join(
            f"`{name}` {count}" for name, count in export["categories"].items()) + " (from " + ", ".join(
            f"{source} {count}" for source, count in export["category_sources"].items()) + ")."]

    lines += ["", "## How it was made", ""]
    for title, counts in facts["breakdown"].items():
        lines += markdown_table([title, "tasks"], [[key, count] for key, count in counts.items()]) + [""]
    lines += [f"![tasks per method, operation and round]({plots['breakdown']})", ""]

    lines += ["## Lengths (words)", ""]
    lines += markdown_table(["field", "min", "median", "mean", "max"],
                            [[field, *((_spread(values) or {}).values() or ["-"] * 4)]
                             for field, values in facts["lengths"].items()])
    lines += ["", f"![length distributions]({plots['lengths']})", "", "## Filtering", ""]
    stats = facts["filter"]
    if stats:
        lines += [f"From `{facts['filter_path']}`: {stats.get('in', '?')} tasks in, {stats.get('kept', '?')} kept, "
                  f"{stats.get('rejected', '?')} rejected.", ""]
        lines += markdown_table(["pass", "in", "out", "reasons"], [
            [e["pass"], e["in"], e["out"], ", ".join(f"{r}: {c}" for r, c in e["reasons"].items()) or "-"]
            for e in stats.get("passes", [])])
        if "filter" in plots:
            lines += ["", f"![filter statistics]({plots['filter']})"]
    else:
        lines += [f"No filter statistics: `{facts['filter_path']}` was not found, so this card cannot say "
                  "which filters ran."]

    lines += ["", "## Teacher", ""]
    lines += markdown_table(["teacher (from lineage)", "tasks"],
                            [[name, count] for name, count in facts["teachers"].items()]
                            or [["not recorded", facts["tasks"]]])
    lines += ["", "Sampling parameters (from lineage):", ""]
    lines += markdown_table(["sampling", "tasks"], [[f"`{key}`", count] for key, count in facts["sampling"].items()]
                            or [["not recorded", facts["tasks"]]])
    tokens = facts["lineage_tokens"]
    lines += ["", f"Tokens that made the exported records (lineage): {tokens['prompt']} prompt + "
              f"{tokens['completion']} completion.", ""]
    generation = facts["generation"]
    if generation:
        cost = generation.get("cost")
        cost_text = f"{cost:.4f}" if isinstance(cost, (int, float)) else "not recorded (no `teacher.prices` set)"
        teacher = generation.get("teacher", {})
        lines += [f"Generation run (`{facts['generation_path']}`): teacher `{teacher.get('backend')}:"
                  f"{teacher.get('model')}`, {generation.get('requests_sent', '?')} requests sent, "
                  f"{generation.get('cache_hits', '?')} cache hits, {generation.get('retries', '?')} retries, "
                  f"{generation.get('failures', '?')} failures; tokens sent in that run "
                  f"{generation.get('prompt_tokens', '?')} prompt + {generation.get('completion_tokens', '?')} "
                  f"completion; cost {cost_text}; {generation.get('wall_seconds', '?')} s."]
    else:
        lines += [f"No generation summary: `{facts['generation_path']}` was not found, so requests, cost and the "
                  "generation command are unknown here."]
    if export.get("negative_teacher"):
        used = export["negative_teacher"]
        lines += ["", f"Negative examples asked of `{used['teacher']}`: {used['requests_sent']} requests, "
                  f"{used['cache_hits']} cache hits, {used['prompt_tokens']} prompt + "
                  f"{used['completion_tokens']} completion tokens."]

    lines += ["", "## Reproduce", ""]
    commands = []
    if generation and generation.get("command"):
        commands.append(generation["command"])
    if stats and stats.get("command"):
        commands.append(stats["command"])
    if export.get("command"):
        commands.append(export["command"])
    lines += ["```bash", *commands, "```", ""] if commands else ["No command was recorded.", ""]
    if generation and generation.get("config"):
        lines += ["Generation config:", "", "```yaml", _yaml(generation["config"]), "```", ""]
    if stats and stats.get("config"):
        lines += ["Filter config (`filter:`):", "", "```yaml", _yaml(stats["config"]), "```", ""]
    lines += ["Export config (`export:`, and the prompt erasure used for chat examples):", "", "```yaml",
              _yaml({"export": facts["export_config"], "chat": facts["chat"]}), "```", ""]
    return "\n".join(lines)


def hf_front_matter(splits: list[str]) -> str:
    """YAML front matter that lets `datasets.load_dataset(OUT)` find the parquet splits."""
    files = "".join(f"  - split: {name}\n    path: data/{name}.parquet\n" for name in splits)
    return f"configs:\n- config_name: default\n  data_files:\n{files}"


def write_card(
    out_dir: Path, *, fmt: str, source: Path, splits: dict[str, list[Task]], provenance: dict[str, Any],
    export_config, export_summary: dict[str, Any], chat: dict[str, Any],
) -> tuple[Path, list[Path]]:
    """Write `out_dir/README.md` and its plots; return the card path and the plot paths."""
    facts = card_facts(
        splits, fmt=fmt, source=str(source),
        generation=read_json_if_there(provenance["summary"]), generation_path=str(provenance["summary"]),
        filter_stats=read_json_if_there(provenance["stats"]), filter_path=str(provenance["stats"]),
        export_summary=export_summary, export_config=export_config.model_dump(mode="json"), chat=chat,
    )
    plots = write_plots(facts, out_dir / "card")
    front = None
    if fmt == "hf":
        front = hf_front_matter([name for name in splits if (out_dir / "data" / f"{name}.parquet").exists()])
    relative = {name: str(path.relative_to(out_dir)) for name, path in plots.items()}
    card = out_dir / "README.md"
    atomic_write_text(card, card_markdown(facts, relative, front) + "\n")
    return card, list(plots.values())
