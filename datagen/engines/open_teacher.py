"""The configured teacher on the configured engine, for every stage that asks a teacher.

`engine: local` gives today's in-process `Teacher`; `engine: ray` gives a `RayTeacher`
(`datagen.engines.ray_teacher`): the same cache keys and statistics in the driver, each
`complete` call with requests not in the cache answered by one Ray Data pipeline. Ray is
imported only when this is called, joined or started (unless it is up already) here or, with
`connect_now=False`, at the first request the cache cannot answer, and shut down when the
teacher closes if it was started for it. So a stage that opens its teacher only when it has
something to ask, with `connect_now=False`, starts Ray only when a reply is not cached.

    from datagen.engines.open_teacher import open_teacher
    with open_teacher(config.teacher, config.engine) as teacher:
        replies = teacher.complete(conversations, params)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datagen.engines.config import EngineConfig
    from datagen.teachers.teacher import Teacher, TeacherConfig


def open_teacher(teacher: TeacherConfig, engine: EngineConfig, connect_now: bool = True) -> Teacher:
    """`teacher` in this process (`engine.kind: local`) or over Ray (`engine.kind: ray`;
    `connect_now`: reach the cluster here, so an unreachable one fails before any work)."""
    if engine.kind == "local":
        from datagen.teachers.teacher import make_teacher

        return make_teacher(teacher)
    from datagen.engines.ray_teacher import ray_teacher

    return ray_teacher(teacher, engine, connect_now=connect_now)
