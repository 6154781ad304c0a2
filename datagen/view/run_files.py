"""The Run page's data: generation summaries, filter statistics, card plots and eval reports.

    run_overview(discover(Path("out/distill")))
    # {"summaries": [{"file", "data"}], "stats": [...], "plots": ["dataset/card/lengths.png"], "reports": [...]}

Each JSON file is returned as it is on disk (the page picks the figures it shows); one
that cannot be read is named with its problem instead of failing the page.
"""

from __future__ import annotations

import json
from typing import Any

from datagen.view.index import DataFiles

# the sample fields shown side by side, in this order; any other text field of a sample
# (e.g. a DPO student's reply) follows them
SAMPLE_COLUMNS = (("request", "request"), ("reference", "teacher"), ("base", "base"), ("tuned", "tuned"))


def _load(files: DataFiles, name: str) -> dict[str, Any]:
    try:
        return {"file": name, "data": json.loads((files.root / name).read_text(encoding="utf-8"))}
    except (OSError, ValueError) as error:
        return {"file": name, "error": str(error)}


def run_overview(files: DataFiles) -> dict[str, Any]:
    reports = [_load(files, name) for name in files.reports]
    reports = [r for r in reports if isinstance(r.get("data"), dict) and "samples" in r["data"] or "error" in r]
    return {
        "root": str(files.root),
        "summaries": [_load(files, name) for name in files.summaries],
        "stats": [_load(files, name) for name in files.stats],
        "plots": list(files.plots),
        "reports": reports,
        "sample_columns": SAMPLE_COLUMNS,
        "overrides": list(files.overrides),
    }
