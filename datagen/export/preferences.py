"""The `preferences` export format: preference pairs split by task, as JSONL and a HF DatasetDict,
with a card that shows the score distributions.

    datagen export pairs.jsonl --format preferences --out prefs/

writes `train.jsonl`, `validation.jsonl`, `test.jsonl` (the pair records unchanged: TRL's
`prompt`/`chosen`/`rejected` plus scores, rationales, lineage), `dataset/`
(`DatasetDict.save_to_disk`), `data/<split>.parquet` and `README.md`.

Splits are by task with the rule every other format uses (`formats.split_by_task`) over the
task ids of the file the pairs were made from (named in `PAIRS.summary.json`; else the
pairs' own task ids), so with the same `export:` settings a task is held out here exactly
when it is held out of the SFT export: no prompt of a held-out task is trained on in
either stage.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from datagen.errors import InputError
from datagen.export.formats import SPLITS, split_by_task
from datagen.export.hf import write_dataset_dict
from datagen.io import (
    atomic_write_text,
    read_records,
    read_tasks,
    summary_path,
    write_jsonl_atomic,
)
from datagen.records import Task


def _source_task_ids(source: Path, pairs: list) -> tuple[list[str], str]:
    """Task ids to split on, and where they came from."""
    summary = summary_path(source)
    if summary.exists():
        try:
            seeds = json.loads(summary.read_text(encoding="utf-8"))["config"]["generate"]["seeds"]
        except (json.JSONDecodeError, KeyError, TypeError):
            seeds = None
        if seeds and Path(seeds).exists():
            return [task.id for task in read_tasks(seeds)], str(seeds)
        if seeds:
            # splitting on the pairs' own ids would hold out other tasks than the SFT export did
            raise InputError(f"{summary}: the pairs were made from {seeds}, which is gone; the split by task "
                             "needs it to match the SFT export's (restore it or rerun from where it is)")
    return list(dict.fromkeys(pair.task_id for pair in pairs)), str(source)


def split_pairs(pairs: list, task_ids: list[str], *, validation: float, test: float, seed: int) -> dict[str, list]:
    """Pairs into train / validation / test by the split of `task_ids` (`split_by_task`)."""
    side = {task.id: name
            for name, tasks in split_by_task([Task(id=task_id, instruction="") for task_id in task_ids],
                                             validation=validation, test=test, seed=seed).items()
            for task in tasks}
    splits: dict[str, list] = {name: [] for name in SPLITS}
    for pair in pairs:
        splits[side.get(pair.task_id, "train")].append(pair)
    return splits


def hf_preference_features():
    import datasets

    string, listing = datasets.Value("string"), getattr(datasets, "List", datasets.Sequence)
    message = listing({"role": string, "content": string})
    return datasets.Features({
        "id": string, "task_id": string, "instance_index": datasets.Value("int32"),
        "prompt": message, "chosen": message, "rejected": message,
        "score_chosen": datasets.Value("float64"), "score_rejected": datasets.Value("float64"),
        "rationale_chosen": string, "rationale_rejected": string, "lineage": string,
    })


def _hf_row(pair) -> dict[str, Any]:
    row = json.loads(pair.to_json())
    return {key: row.get(key) for key in hf_preference_features()} | {
        "lineage": json.dumps(row.get("lineage") or {}, ensure_ascii=False)}


def write_preference_files(splits: dict[str, list], out_dir: Path) -> list[Path]:
    """JSONL per split, the DatasetDict and parquet per split (an empty split: JSONL only)."""
    written = []
    for name, pairs in splits.items():
        path = out_dir / f"{name}.jsonl"
        write_jsonl_atomic(path, (pair.to_json() for pair in pairs))
        written.append(path)
    present = {name: [_hf_row(p) for p in pairs] for name, pairs in splits.items() if pairs or name == "train"}
    return written + write_dataset_dict(present, hf_preference_features(), out_dir)


def score_distribution(pairs: list) -> list[tuple[int, int, int]]:
    """(score, pairs whose chosen has it, pairs whose rejected has it) for scores 1..10
    (half points round down)."""
    chosen = Counter(int(p.score_chosen) for p in pairs if p.score_chosen is not None)
    rejected = Counter(int(p.score_rejected) for p in pairs if p.score_rejected is not None)
    return [(score, chosen[score], rejected[score]) for score in range(1, 11)]


def preference_card(source: Path, splits: dict[str, list], split_source: str, generation: dict | None,
                    front_matter: str) -> str:
    """The card: counts, score distributions, margins, responders, judge, provenance."""
    from datagen.export.card import markdown_table

    everything = [pair for pairs in splits.values() for pair in pairs]
    margins = [p.score_chosen - p.score_rejected for p in everything
               if p.score_chosen is not None and p.score_rejected is not None]
    lines = [f"---\n{front_matter.rstrip()}\n---\n", f"# Dataset card: {source.name} (preferences)", "",
             f"AI-feedback preference pairs made with datagen (`generate --method preferences`) from "
             f"`{source}`, in TRL's conversational preference shape (`prompt`, `chosen`, `rejected`). "
             f"Splits are by task (task ids of `{split_source}`): no task has pairs in two splits.", "",
             "## Contents", ""]
    lines += markdown_table(["split", "pairs", "tasks"],
                            [[name, len(pairs), len({p.task_id for p in pairs})] for name, pairs in splits.items()])
    unrated = len(everything) - len([p for p in everything if p.score_chosen is not None])
    lines += ["", "## Score distribution (teacher ratings, 1-10)", ""]
    pairwise = sum(1 for p in everything if p.lineage is not None and getattr(p.lineage, "judging", "") == "pairwise")
    if unrated - pairwise:
        lines += [f"{unrated - pairwise} pairs are not rated (chosen by responder, `chosen_responder`).", ""]
    if pairwise:
        lines += [f"{pairwise} pairs were judged pairwise (wins in both orders, no 1-10 score; "
                  "`judging: pairwise`).", ""]
    aspects = sum(1 for p in everything if p.lineage is not None
                  and getattr(p.lineage, "judging", "") == "ultrafeedback")
    if aspects:
        lines += [f"{aspects} pairs were rated with `judging: ultrafeedback`: their score is the mean of four "
                  "1-5 aspect ratings, counted below by its whole part.", ""]
    lines += markdown_table(["score", "chosen", "rejected"], [list(row) for row in score_distribution(everything)])
    if margins:
        lines += ["", f"Score margin chosen - rejected: min {min(margins):g}, median {statistics.median(margins):g}, "
                      f"mean {statistics.fmean(margins):.2f}, max {max(margins):g}."]
    lineages = [p.lineage for p in everything if p.lineage is not None]
    if lineages:
        responders = Counter((side, getattr(lin, "responders", {}).get(side, {}).get("name"))
                             for lin in lineages for side in ("chosen", "rejected"))
        lines += ["", "## Responders and judge", ""]
        lines += markdown_table(["side", "responder", "pairs"], [[side, name, count] for (side, name), count
                                                           in sorted(responders.items(), key=str)])
        judges = Counter(f"{lin.teacher_backend}:{lin.teacher_model}" for lin in lineages)
        templates = Counter(f"{lin.template} ({lin.template_sha256})" for lin in lineages)
        lines += ["", "Judge: " + ", ".join(f"`{name}` ({count} pairs)" for name, count in judges.items()),
                  "Rating template: " + ", ".join(f"`{name}`" for name in templates)]
    lines += ["", "## Generation", ""]
    if generation is None:
        lines.append(f"No generation summary beside the pairs ({summary_path(source)} is missing).")
    else:
        lines += [f"Command: `{generation.get('command', '')}`", "", "Rejects by reason:", ""]
        lines += markdown_table(["reason", "count"],
                                [[r, c] for r, c in generation.get("rejects_by_reason", {}).items()] or [["none", 0]])
    return "\n".join(lines) + "\n"


def export_preferences(config, source: Path, out_dir: Path) -> tuple[dict[str, Any], list[Path]]:
    """Write the preferences export; return the summary fields and the files written."""
    from datagen.export.card import hf_front_matter, read_json_if_there
    from datagen.generators.preferences import PreferencePair

    pairs = list(read_records(source, PreferencePair))
    if not pairs:
        raise InputError(f"{source}: no preference pairs in file")
    task_ids, split_source = _source_task_ids(source, pairs)
    settings = config.export
    splits = split_pairs(pairs, task_ids, validation=settings.validation, test=settings.test, seed=settings.seed)
    written = write_preference_files(splits, out_dir)
    front = hf_front_matter([name for name in splits if (out_dir / "data" / f"{name}.parquet").exists()])
    card = out_dir / "README.md"
    generation = read_json_if_there(summary_path(source))
    atomic_write_text(card, preference_card(source, splits, split_source, generation, front))
    summary = {
        "tasks": len({p.task_id for p in pairs}), "instances": len(pairs), "split_on": split_source,
        "splits": {name: {"tasks": len({p.task_id for p in members}), "instances": len(members)}
                   for name, members in splits.items()},
        "score_distribution": {"score": [s for s, _c, _r in score_distribution(pairs)],
                               "chosen": [c for _s, c, _r in score_distribution(pairs)],
                               "rejected": [r for _s, _c, r in score_distribution(pairs)]},
    }
    return summary, written + [card]
