"""`datagen dedup --engine datatrove|ray|slurm`: exact + MinHash near dedup as datatrove stages.

The same decisions as the single-process `datagen dedup` (kept ids, rejects with their
reasons and details, in the same order), computed in stages that datatrove runs over N
byte-range shards of the input on its LocalPipelineExecutor, RayPipelineExecutor or
SlurmPipelineExecutor:

    datagen dedup raw.jsonl --out kept.jsonl --engine datatrove --tasks 4
    datagen dedup raw.jsonl --out kept.jsonl --engine ray --tasks 64      # engine.address, RAY_ADDRESS or a local Ray
    datagen dedup raw.jsonl --out kept.jsonl --engine slurm --tasks 256 --partition cpu

    from datagen.engines.sharded_dedup import ScaleDedupPlan, run_scaled_dedup
    stats = run_scaled_dedup(ScaleDedupPlan(source, out, rejects, work, DedupConfig(), tasks=4), "datatrove")

Stages (tasks), each a datatrove `PipelineStep` reading and writing files under the work
folder (`KEPT.work/` by default; datatrove's logs and completion marks are there too, so a
rerun skips finished tasks):

1. read (N): parse the shard's lines; per task the keys the later stages need: blake2b of the
   `normalize`d text (exact dedup), of the token sequence (identical texts form one node, as in
   `near_dedup`), of the id; the keep-rule values; the `shingle_hash` of every shingle.
2. group (1): invalid lines and repeated ids (as `read_tasks_lenient` words them), exact dedup,
   nodes and their best task, the IDF table over the nodes' shingles. Keys and every shard's
   shingle hashes (8 bytes a shingle; ~300 bytes a task in all) plus one entry per distinct
   shingle: no task text.
3. signatures (N): the MinHash of each node whose first task is in the shard: our shingles,
   weights, `hash_elements` and `minhash_signatures` (scheme `MINHASH_SCHEME`, pinned), so
   the signatures are the single-process ones bit for bit.
4. buckets (min(N, bands)): per band, the nodes agreeing on all its rows (`band_pair_codes`).
5. decide (1): our decision rule on the candidate pairs: the exact ROUGE-L + weighted-Jaccard
   verification and `keep_clusters` (best task kept per cluster, star or connected). It reads
   only the candidate pairs and the texts of the nodes in them (by byte offset), so its
   memory grows with the candidate pairs, not with the tasks.
6. write (N): each shard's kept tasks and rejects; 7. collect (1): kept.jsonl, the rejects
   file (invalid lines, exact, near, each in input order as `run_filter` writes them) and
   stats.json.

Hashes stand in for text equality in stages 1-2 (128-bit blake2b; 64-bit for shingles in the
IDF table): a collision would merge two texts, at odds of ~n^2 / 2^129.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.pipeline.base import PipelineStep

from datagen.engines.datatrove_run import (
    EngineOptions,
    check_engine,
    executors_for,
    run_executors,
    shard_count,
    start_engine,
    submit_to_slurm,
)
from datagen.engines.shards import (
    ShardTasks,
    best_of_groups,
    check_work_folder,
    concatenate_files,
    decode_line,
    first_lines,
    groups_of,
    invalid_lines,
    load_json,
    load_npz,
    read_lines_at,
    report_stage_error,
    save_json,
    save_npz,
    shard_lines,
    text_key,
)
from datagen.errors import ConfigError, InputError
from datagen.filters.base import text_of
from datagen.filters.dedup import (
    EXACT_REASON,
    NEAR_REASON,
    DedupConfig,
    NearDedupReport,
    Similarity,
    TextNodes,
    Vocabulary,
    adjacency,
    band_pair_codes,
    hash_elements,
    idf_weight,
    keep_clusters,
    keep_rank,
    lsh_bands,
    minhash_signatures,
    normalize,
    pairs_of_codes,
    rouge_tokens,
    shingle_hash,
    shingles,
)
from datagen.io import atomic_write_json, stats_path, write_file_atomic
from datagen.records import Reject, Task
from datagen.rejects import INVALID_LINE, STAGE_READ

STAGE_EXACT, STAGE_NEAR = "exact-dedup", "near-dedup"  # the pass names run_filter writes
DEDUP_PASSES = (STAGE_EXACT, STAGE_NEAR)  # the passes these stages run, in the order they run them


@dataclass
class ScaleDedupPlan:
    """One sharded dedup run: where it reads and writes, its settings and its shard count."""

    source: Path
    out: Path
    rejects: Path
    work: Path
    config: DedupConfig
    tasks: int = 2
    skip_invalid: bool = False
    command: str = ""
    bands: tuple[int, int] = field(default=(0, 0))  # (b, r), from the config
    passes: tuple[str, ...] = DEDUP_PASSES  # either or both (`datagen filter --engine`)

    def __post_init__(self) -> None:
        self.source, self.out, self.rejects, self.work = map(Path, (self.source, self.out, self.rejects, self.work))
        if self.tasks < 1:
            raise ConfigError(f"--tasks: must be at least 1, got {self.tasks}")
        self.bands = lsh_bands(self.config.threshold, self.config.num_perm, self.config.weights)
        self.passes = tuple(self.passes)

    def dir(self, stage: str) -> Path:
        return self.work / stage


# -- helpers ------------------------------------------------------------------------------------


















def _rank_width(config: DedupConfig) -> int:
    return len(keep_rank(Task(id="x", instruction="x"), 0, config.keep)) - 1


# -- stage 1: read ------------------------------------------------------------------------------




def read_shard(plan: ScaleDedupPlan, rank: int, world_size: int) -> None:
    config, width = plan.config, _rank_width(plan.config)
    offsets, indexes, exact, node, ident, whole, ranks, starts, hashes, ids = ([] for _ in range(10))
    shard = ShardTasks(plan.source, rank, world_size)
    for offset, index, task in shard:
        text = text_of(task, config.fields)
        tokens = rouge_tokens(text)
        offsets.append(offset)
        indexes.append(index)
        exact.append(text_key(normalize(text)))
        node.append(text_key("\x00".join(tokens)) if tokens else np.zeros(2, dtype="<u8"))
        ident.append(text_key(task.id))
        whole.append(text_key(task.to_json()))
        ranks.append(keep_rank(task, 0, config.keep)[:-1])  # the position is added in `group`
        starts.append(len(hashes))
        if tokens:
            hashes.extend(shingle_hash(shingle) for shingle in shingles(tokens, config))
        ids.append(task.id)
    starts.append(len(hashes))
    out = plan.dir("read")
    save_npz(out / f"{rank:05d}.npz", offset=np.array(offsets, dtype=np.int64), index=np.array(indexes, np.int64),
              exact=np.array(exact, dtype="<u8").reshape(-1, 2), node=np.array(node, dtype="<u8").reshape(-1, 2),
              ident=np.array(ident, dtype="<u8").reshape(-1, 2), whole=np.array(whole, dtype="<u8").reshape(-1, 2),
              rank=np.array(ranks, dtype=np.float64).reshape(len(ranks), width),
              starts=np.array(starts, dtype=np.int64), hashes=np.array(hashes, dtype=np.uint64))
    save_json(out / f"{rank:05d}.json", {"lines": shard.lines, "ids": ids, "errors": shard.errors,
                                          "fatal": shard.fatal})


# -- stage 2: group -----------------------------------------------------------------------------










def group_all(plan: ScaleDedupPlan, world_size: int) -> None:
    config, out = plan.config, plan.dir("group")
    metas = [load_json(plan.dir("read") / f"{rank:05d}.json") for rank in range(world_size)]
    first_line = first_lines(plan.source, metas)  # line number before each shard
    shards = [load_npz(plan.dir("read") / f"{rank:05d}.npz") for rank in range(world_size)]
    shard = np.concatenate([np.full(len(s["index"]), rank, dtype=np.int64) for rank, s in enumerate(shards)])
    index = np.concatenate([s["index"] for s in shards])
    line = first_line[shard] + index + 1
    offset = np.concatenate([s["offset"] for s in shards])
    cat = {name: np.concatenate([s[name] for s in shards]) for name in ("exact", "node", "ident", "whole", "rank")}
    ids = [task_id for meta in metas for task_id in meta["ids"]]

    # invalid lines, then ids an earlier line already used: read_tasks_lenient's words
    invalid, repeated, first_of_id = invalid_lines(plan.source, metas, first_line, line, cat["ident"], cat["whole"],
                                                   ids.__getitem__, plan.skip_invalid)
    rejects: list[dict[int, list]] = [{} for _ in range(world_size)]  # shard -> index -> reject fields
    for rank, meta in enumerate(metas):
        for at, problem in meta["errors"]:
            where = f"{plan.source}:{first_line[rank] + at + 1}"
            rejects[rank][at] = [STAGE_READ, INVALID_LINE, None, f"{where}: {problem}"]
    for row in repeated.tolist():
        rejects[shard[row]][int(index[row])] = [STAGE_READ, INVALID_LINE, None,
                                                f"{plan.source}:{line[row]}: " + dict(invalid)[int(line[row])]]
    valid = first_of_id == np.arange(len(line))
    rank_full = np.column_stack([cat["rank"], -line.astype(np.float64)])  # keep_rank: position last

    # exact dedup over the valid tasks
    rows = np.flatnonzero(valid)
    keeper = (rows[best_of_groups(groups_of(cat["exact"][rows]), rank_full[rows])] if STAGE_EXACT in plan.passes
              else rows)
    exact_removed = rows[keeper != rows]
    exact_keeper = keeper[keeper != rows]
    # near: the exact survivors with tokens, grouped into nodes numbered by first appearance
    survivors = np.setdiff1d(rows, exact_removed)
    texts = survivors[(cat["node"][survivors] != 0).any(axis=1)] if STAGE_NEAR in plan.passes else survivors[:0]
    if len(texts):
        _, first, inverse = np.unique(cat["node"][texts], axis=0, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        renumber = np.empty(len(first), dtype=np.int64)
        renumber[np.argsort(first, kind="stable")] = np.arange(len(first))
        node_of = renumber[inverse]
        first_row = np.empty(len(first), dtype=np.int64)
        first_row[renumber] = texts[first]
    else:
        node_of = first_row = np.empty(0, dtype=np.int64)
    nodes = len(first_row)
    face_row = texts[best_of_groups(node_of, rank_full[texts])] if nodes else np.empty(0, np.int64)
    face_of_node = np.full(nodes, -1, dtype=np.int64)
    face_of_node[node_of] = face_row

    # IDF table over the nodes' shingles (each node counted once)
    row_start = np.cumsum([0] + [len(x["index"]) for x in shards])
    local = np.arange(len(line)) - row_start[shard]  # a row's place in its shard's arrays
    node_hashes = [shards[shard[row]]["hashes"][shards[shard[row]]["starts"][local[row]]:
                                                shards[shard[row]]["starts"][local[row] + 1]]
                   for row in first_row.tolist()]
    hashes, frequency = (np.unique(np.concatenate(node_hashes), return_counts=True) if node_hashes
                         else (np.empty(0, np.uint64), np.empty(0, np.int64)))
    if config.weighting == "none":
        weights = np.ones(len(hashes), dtype=np.int64)
    else:
        by_df = {int(df): idf_weight(int(df), nodes) for df in np.unique(frequency).tolist()}
        weights = np.array([by_df[int(df)] for df in frequency.tolist()], dtype=np.int64)
    save_npz(out / "weights.npz", hashes=hashes, weights=weights)

    # who rejects whom, as far as this stage knows (decide may move a node's tasks to another keeper)
    needed = set(exact_keeper.tolist()) | set(face_of_node.tolist())
    id_of = {row: ids[row] for row in needed}
    for row, kept in zip(exact_removed.tolist(), exact_keeper.tolist()):
        rejects[shard[row]][int(index[row])] = [STAGE_EXACT, EXACT_REASON, id_of[kept], None]
    identical = (1.0, 1.0) if config.verify else (1.0,)
    similarity_names = ("rouge_l", "weighted_jaccard") if config.verify else ("minhash_jaccard",)
    identical_detail = " ".join(f"{name}={score:.3f}" for name, score in zip(similarity_names, identical))
    for row, node in zip(texts.tolist(), node_of.tolist()):
        if row != face_of_node[node]:
            rejects[shard[row]][int(index[row])] = [STAGE_NEAR, NEAR_REASON, id_of[face_of_node[node]],
                                                    identical_detail]
    sign = np.zeros(len(line), dtype=bool)
    sign[first_row] = True
    node_per_row = np.full(len(line), -1, dtype=np.int64)
    node_per_row[texts] = node_of
    for rank in range(world_size):
        mine = shard == rank
        save_npz(out / f"{rank:05d}.npz", index=index[mine], node=node_per_row[mine], sign=sign[mine])
        save_json(out / f"{rank:05d}.json", {str(k): v for k, v in rejects[rank].items()})
    save_npz(out / "nodes.npz", face_rank=rank_full[face_of_node] if nodes else np.empty((0, rank_full.shape[1])),
              face_offset=offset[face_of_node], first_offset=offset[first_row])
    save_json(out / "summary.json", {
        "in": int(valid.sum()) + len(invalid), "invalid_lines": len(invalid),
        "valid": int(valid.sum()), "exact_removed": int(len(exact_removed)),
        "near_in": int(len(survivors)), "nodes": nodes, "identical": int(len(texts) - nodes)})



# -- stage 3: signatures ------------------------------------------------------------------------


def sign_shard(plan: ScaleDedupPlan, rank: int, world_size: int) -> None:
    """MinHash signatures of the nodes first seen in this shard, exactly as `near_dedup` makes them."""
    config = plan.config
    read = load_npz(plan.dir("read") / f"{rank:05d}.npz")
    grouped = load_npz(plan.dir("group") / f"{rank:05d}.npz")
    table = load_npz(plan.dir("group") / "weights.npz")
    rows = np.flatnonzero(grouped["sign"])
    hashes, starts = read["hashes"].tolist(), read["starts"].tolist()
    # one lookup for the whole shard; rows that are not signed (exact or identical duplicates)
    # may hold shingles the table lacks: clipped, and never used
    where = np.minimum(np.searchsorted(table["hashes"], read["hashes"]), max(len(table["hashes"]) - 1, 0))
    weights = table["weights"][where].tolist() if len(table["hashes"]) else [1] * len(hashes)
    elements_of: dict[int, list[int]] = {}

    def elements(row: int) -> list[int]:
        found = []
        for at in range(starts[row], starts[row + 1]):
            digest = hashes[at]
            if digest not in elements_of:
                elements_of[digest] = hash_elements(digest, weights[at])
            found.extend(elements_of[digest])
        return found

    signatures = minhash_signatures((elements(row) for row in rows.tolist()), config.num_perm, config.seed)
    out = plan.dir("signatures")
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out / f"{rank:05d}.npy", lambda temp: np.save(temp.open("wb"), signatures))
    save_npz(out / f"{rank:05d}.nodes.npz", node=grouped["node"][rows])


# -- stage 4: buckets ---------------------------------------------------------------------------


def bucket_bands(plan: ScaleDedupPlan, rank: int, world_size: int, shards: int) -> None:
    """Candidate pairs of bands rank, rank + world_size, ...: nodes sharing a bucket in that band."""
    b, r = plan.bands
    nodes = load_json(plan.dir("group") / "summary.json")["nodes"]
    signed = [np.load(plan.dir("signatures") / f"{shard:05d}.npy", mmap_mode="r") for shard in range(shards)]
    node_ids = np.concatenate([load_npz(plan.dir("signatures") / f"{shard:05d}.nodes.npz")["node"]
                               for shard in range(shards)])
    out = plan.dir("buckets")
    out.mkdir(parents=True, exist_ok=True)
    for band in range(rank, b, world_size):
        columns = np.concatenate([matrix[:, band * r:(band + 1) * r] for matrix in signed]) if nodes > 1 else \
            np.empty((0, r), dtype=np.uint32)
        codes = np.unique(band_pair_codes(columns, node_ids, nodes))
        write_file_atomic(out / f"{band:04d}.npy", lambda temp, codes=codes: np.save(temp.open("wb"), codes))


# -- stage 5: decide ----------------------------------------------------------------------------


def decide(plan: ScaleDedupPlan, shards: int) -> None:
    """`near_dedup`'s verification and decision rule on the candidate pairs alone.

    Memory: the distinct candidate pairs (8 bytes each, plus the band files merged one at a
    time), and for each node in a pair its tokens, shingle weights and keep rank. Nodes are
    renumbered 0..m-1 in their global order, so every order the rule depends on is kept.
    """
    config = plan.config
    started = time.perf_counter()
    b, r = plan.bands
    summary = load_json(plan.dir("group") / "summary.json")
    n = summary["nodes"]
    codes = np.empty(0, dtype=np.int64)
    for band in range(b):
        codes = np.union1d(codes, np.load(plan.dir("buckets") / f"{band:04d}.npy"))
    pairs = pairs_of_codes(codes, max(n, 1))
    involved = np.unique(pairs)
    compact = np.searchsorted(involved, pairs)
    table = load_npz(plan.dir("group") / "nodes.npz")
    lines = read_lines_at(plan.source, [*table["face_offset"][involved].tolist(),
                                        *table["first_offset"][involved].tolist()])
    faces = [Task.model_validate_json(lines[offset]) for offset in table["face_offset"][involved].tolist()]
    first_ids = [Task.model_validate_json(lines[offset]).id for offset in table["first_offset"][involved].tolist()]
    vocabulary = Vocabulary()
    token_ids = [[vocabulary[token] for token in rouge_tokens(text_of(task, config.fields))] for task in faces]
    nodes = TextNodes(token_ids, [[i] for i in range(len(faces))], list(vocabulary))
    weights = load_npz(plan.dir("group") / "weights.npz")
    weight: dict = {}
    for node in range(len(faces)):
        for shingle in shingles(nodes.tokens(node), config):
            if shingle not in weight:
                weight[shingle] = int(weights["weights"][np.searchsorted(weights["hashes"], shingle_hash(shingle))])
    signatures = np.empty((len(involved), config.num_perm), dtype=np.uint32)
    if not config.verify:  # the MinHash estimate decides: the involved nodes' signatures
        for shard in range(shards):
            mine = load_npz(plan.dir("signatures") / f"{shard:05d}.nodes.npz")["node"]
            hit = np.isin(mine, involved)
            signatures[np.searchsorted(involved, mine[hit])] = np.load(plan.dir("signatures") / f"{shard:05d}.npy")[hit]
    report = NearDedupReport(tasks=summary["near_in"], num_perm=config.num_perm, b=b, r=r,
                             identical=summary["identical"], indexed=n, candidate_pairs=len(pairs))
    similarity = Similarity(config, nodes, weight, signatures)
    edges = similarity.edges(compact, report)
    report.duplicate_pairs = len(edges)
    neighbours = adjacency(edges)
    rank = {node: tuple(table["face_rank"][involved[node]].tolist()) for node in neighbours}
    removed = {}
    for node, (kept, scores) in keep_clusters(neighbours, rank, config.cluster).items():
        if scores is not None:
            detail = similarity.describe(scores)
        else:  # "connected": the kept task may be reachable only through other tasks
            measured = similarity.measure(node, kept)
            detail = similarity.describe(measured)
            if not similarity.passes(measured):
                other, link = max(neighbours[node], key=lambda edge: edge[1])
                detail += f"; linked via {first_ids[other]} ({similarity.describe(link)})"
        removed[str(int(involved[node]))] = [faces[kept].id, detail]
    report.seconds["decide"] = time.perf_counter() - started
    save_json(plan.dir("decide") / "removed.json", removed)
    save_json(plan.dir("decide") / "report.json", asdict(report))


# -- stage 6: write; stage 7: collect -----------------------------------------------------------

_PARTS = ("kept", STAGE_READ, STAGE_EXACT, STAGE_NEAR)


def write_shard(plan: ScaleDedupPlan, rank: int, world_size: int) -> None:
    """This shard's kept tasks and its rejects, one file per kind, in input order."""
    grouped = load_npz(plan.dir("group") / f"{rank:05d}.npz")
    node_of = dict(zip(grouped["index"].tolist(), grouped["node"].tolist()))
    rejects = load_json(plan.dir("group") / f"{rank:05d}.json")
    removed = load_json(plan.dir("decide") / "removed.json")
    out = plan.dir("write")
    out.mkdir(parents=True, exist_ok=True)
    parts = {part: [] for part in _PARTS}
    for offset, index, raw in shard_lines(plan.source, rank, world_size):
        line = decode_line(raw, offset)
        if not line or not line.strip():
            continue
        found = rejects.get(str(index))
        if found is not None and found[0] == STAGE_READ:
            parts[STAGE_READ].append(Reject(reason=found[1], stage=STAGE_READ, detail=found[3], raw=line).to_json())
            continue
        task = Task.model_validate_json(line)
        node = str(node_of.get(index, -1))
        if node in removed and (found is None or found[0] == STAGE_NEAR):
            found = [STAGE_NEAR, NEAR_REASON, *removed[node]]
        if found is None:
            parts["kept"].append(task.to_json())
        else:
            stage, reason, duplicate_of, detail = found
            parts[stage].append(Reject(reason=reason, stage=stage, detail=detail, task=task,
                                       duplicate_of=duplicate_of).to_json())
    for part, lines in parts.items():
        (out / f"{rank:05d}.{part}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")




def _count(path: Path, key: str) -> Counter:
    counts: Counter = Counter()
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            counts[json.loads(line)[key]] += 1
    return counts


def collect(plan: ScaleDedupPlan, shards: int, engine: str) -> dict[str, Any]:
    """kept.jsonl, the rejects file and stats.json, in the shape `run_filter` writes them."""
    parts = {part: [plan.dir("write") / f"{rank:05d}.{part}.jsonl" for rank in range(shards)] for part in _PARTS}
    summary = load_json(plan.dir("group") / "summary.json")
    report = NearDedupReport(**{**load_json(plan.dir("decide") / "report.json")})
    exact = sum((_count(path, "reason") for path in parts[STAGE_EXACT]), Counter())
    near = sum((_count(path, "reason") for path in parts[STAGE_NEAR]), Counter())
    keepers = set()
    for path in parts[STAGE_NEAR]:
        with path.open(encoding="utf-8") as lines:
            keepers.update(json.loads(line)["duplicate_of"] for line in lines)
    report.removed, report.clusters = sum(near.values()), len(keepers)
    concatenate_files(parts["kept"], plan.out)
    concatenate_files(parts[STAGE_READ] + parts[STAGE_EXACT] + parts[STAGE_NEAR], plan.rejects)
    valid, near_in = summary["valid"], summary["near_in"]
    passes = [
        {"pass": STAGE_EXACT, "in": valid, "out": near_in, "rejected": valid - near_in,
         "reasons": dict(exact.most_common())},
        {"pass": STAGE_NEAR, "in": near_in, "out": near_in - report.removed, "rejected": report.removed,
         "reasons": dict(near.most_common()), "report": report.summary()},
    ]
    stats: dict[str, Any] = {
        "input": str(plan.source), "in": summary["in"], "invalid_lines": summary["invalid_lines"],
        "passes": [entry for entry in passes if entry["pass"] in plan.passes],
        "kept": near_in - report.removed, "rejected": summary["invalid_lines"] + valid - near_in + report.removed,
        "wall_seconds": round(time.time() - load_json(plan.work / "run.json")["started"], 3), "command": plan.command,
        "config": {"passes": list(plan.passes), "skip_invalid": plan.skip_invalid,
                   "dedup": plan.config.model_dump(mode="json")},
        "engine": {"name": engine, "tasks": shards, "work": str(plan.work)},
    }
    atomic_write_json(stats_path(plan.out), stats)
    return stats


# -- datatrove steps and the driver --------------------------------------------------------------


class DedupStage(PipelineStep):
    """One stage of the sharded dedup as a datatrove step: datatrove gives it its rank."""

    type = "datagen dedup"

    def __init__(self, plan: ScaleDedupPlan, stage: str, shards: int, engine: str) -> None:
        super().__init__()
        self.plan, self.stage, self.shards, self.engine, self.name = plan, stage, shards, engine, stage

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        with self.track_time("task"):
            if self.stage == "read":
                read_shard(self.plan, rank, world_size)
            elif self.stage == "group":
                try:
                    group_all(self.plan, self.shards)
                except InputError as error:
                    report_stage_error(self.plan.dir("group") / "error.txt", error, self.engine)
            elif self.stage == "signatures":
                sign_shard(self.plan, rank, world_size)
            elif self.stage == "buckets":
                bucket_bands(self.plan, rank, world_size, self.shards)
            elif self.stage == "decide":
                decide(self.plan, self.shards)
            elif self.stage == "write":
                write_shard(self.plan, rank, world_size)
            elif self.stage == "collect":
                collect(self.plan, self.shards, self.engine)
        yield from ()


STAGES = ("read", "group", "signatures", "buckets", "decide", "write", "collect")


def stage_tasks(plan: ScaleDedupPlan) -> dict[str, int]:
    """How many datatrove tasks each stage runs."""
    many = {"read", "signatures", "write"}
    return {stage: plan.tasks if stage in many else (min(plan.tasks, plan.bands[0]) if stage == "buckets" else 1)
            for stage in STAGES}


def build_executors(plan: ScaleDedupPlan, engine: str, options: EngineOptions) -> list:
    """One datatrove executor per stage (Slurm ones chained with `depends`), in stage order."""
    return executors_for([(DedupStage(plan, stage, plan.tasks, engine), tasks)
                          for stage, tasks in stage_tasks(plan).items()], plan.work, engine, options)


def run_scaled_dedup(plan: ScaleDedupPlan, engine: str, options: EngineOptions | None = None) -> dict[str, Any]:
    """Run every stage on `engine` and write kept, rejects and stats; return the stats.

    Slurm: submits the chained array jobs with sbatch and returns {"submitted": [job ids],
    "work": folder}; the last job (collect) writes the outputs, the work folder stays.
    """
    options = options or EngineOptions()
    check_engine(engine, options)
    check_work_folder(plan, {"dedup": plan.config.model_dump(mode="json")})
    executors = build_executors(plan, engine, options)
    if engine == "slurm":
        return {"submitted": submit_to_slurm(executors), "work": str(plan.work)}
    start_engine(engine, options)
    timings = run_executors(plan.work, executors, "dedup", {plan.dir("group") / "error.txt": InputError})
    stats = load_json(stats_path(plan.out))
    stats["engine"]["stage_seconds"] = timings
    atomic_write_json(stats_path(plan.out), stats)
    shutil.rmtree(plan.work)
    return stats


def dedup_command(settings, source: Path, out: Path, rejects: Path, engine: str, tasks: int | None,
                  options: EngineOptions, work: Path | None, command_line: str) -> dict[str, Any]:
    """`datagen dedup --engine ...` (`settings`: the loaded config): `run_scaled_dedup`'s result."""
    plan = ScaleDedupPlan(source, out, rejects, work or out.with_name(out.name + ".work"), settings.filter.dedup,
                          tasks=shard_count(tasks),
                          skip_invalid=settings.filter.skip_invalid, command=command_line)
    return run_scaled_dedup(plan, engine, options)
