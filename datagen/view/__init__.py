"""`datagen view PATH`: a local web page to browse, trace and curate a run.

PATH is a run folder (`distill.workdir`, or any folder holding generate / filter / export /
eval outputs) or one task JSONL. The page lists kept and rejected tasks (search, sort,
facets, paged on the server), shows one task with its lineage, the run's summaries, filter
statistics, card plots and eval samples, and records keep/drop marks in an overrides JSONL
beside the data (the `manual` filter pass applies them).

    from datagen.view import serve
    serve(Path("out/distill"), host="127.0.0.1", port=8765)

Pieces: `index` (a light index of every task line: byte offsets and the table's columns,
read in a background thread), `index_cache` (a big file's parsed rows, cached beside it),
`detail` (one task's page: lineage chain, children, most similar instructions),
`run_files` (the summaries, stats, card plots and eval reports under PATH), `server` (the
HTTP handler, standard library only) and `static/` (the page: plain HTML, CSS and JS
shipped as package data). The marks file is read and written by `datagen.filters.manual`.
"""

from datagen.view.server import serve

__all__ = ["serve"]
