"""Engines: where work runs. One word, one vocabulary, one way to join Ray.

An engine is where a stage's work runs; the stage decides what the work is. Two kinds of
work can leave this process, and each stage offers the engines that fit it:

- teacher calls (generation, export's teacher negatives and categories, ...): the config's
  `engine.kind` (`TEACHER_ENGINES`): `local` (this process) or `ray` (a Ray Data pipeline,
  `ray_teacher`); see `config.EngineConfig` and `open_teacher`.
- filter shards (`datagen filter|dedup --engine`, `SHARD_ENGINES`): `local` (one process),
  `datatrove` (datatrove's processes on this machine), `ray` (datatrove's Ray executor) or
  `slurm` (array jobs); see `sharded_filter`, `sharded_dedup`, `datatrove_run`, `shards`.

`ray` means the same cluster either way, joined the same way (`ray_cluster.join_ray`):
`engine.address` from the config, else RAY_ADDRESS, else a Ray started on this machine.

Modules (Ray and datatrove are imported only when a run uses them):
    config          the `engine:` config section (kind, address, replicas, ...) and the Ray routes
    open_teacher    the configured teacher on the configured engine
    ray_cluster     joining Ray (the one way)
    ray_teacher     RayTeacher / RayBackend: teacher requests answered by Ray Data
    shards          byte-range shards of a JSONL file and the work files sharded stages share
    datatrove_run   sharded stages on datatrove's executors (local processes, Ray, Slurm)
    sharded_dedup   exact + near dedup as datatrove stages
    sharded_filter  the filter passes as datatrove stages, sharded as each pass's registry entry says
"""

TEACHER_ENGINES = ("local", "ray")  # the config's engine.kind: where teacher calls go
SHARD_ENGINES = ("local", "datatrove", "ray", "slurm")  # --engine of filter / dedup: where filter shards go
