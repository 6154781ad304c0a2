"""The `engine:` config section: where a run's teacher calls go, this process or a Ray cluster.

    engine:
      kind: ray              # local (default: today's single-process loop) | ray
      address: auto          # Ray address; unset = RAY_ADDRESS, else a Ray started on this machine
                             # (also what `datagen filter|dedup --engine ray` joins)
      replicas: 4            # teacher replicas (Ray Data actors / vLLM engines)
      tensor_parallel: 2     # GPUs per vLLM engine (teacher.backend: vllm only)
      batch_size: 32         # requests per Ray Data batch (one shard of the stream)
      resources: {CPU: 1, GPU: 1}   # per actor; vllm route: per TP rank (a replica takes 2 here)

Which Ray route a run takes depends on `teacher.backend` (`ray_route`):
`vllm` -> `ray.data.llm` with `vLLMEngineProcessorConfig`; `openai` with one base URL ->
`HttpRequestProcessorConfig`; anything else (`local`, `openai` with several base URLs, a
backend a test injects) -> a `map_batches` actor pool, one teacher backend per actor.
Nothing here imports Ray.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from datagen.config import Strict
from datagen.engines import TEACHER_ENGINES

ROUTE_VLLM = "ray.data.llm vLLMEngineProcessorConfig"
ROUTE_HTTP = "ray.data.llm HttpRequestProcessorConfig"
ROUTE_ACTORS = "map_batches actor pool (one teacher backend per actor)"


class EngineConfig(Strict):
    """Where generation runs; every field but `kind` is for `kind: ray`."""

    kind: Literal[TEACHER_ENGINES] = "local"  # type: ignore[valid-type]
    # None: RAY_ADDRESS, else start a Ray instance on this machine; "auto": join the running
    # cluster; "ray://head:10001": Ray client (datagen.engines.ray_cluster.join_ray)
    address: str | None = None
    replicas: int = Field(1, ge=1)
    tensor_parallel: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    # Ray resources per actor, e.g. {"CPU": 1} or {"GPU": 1}; other keys are custom resources.
    # On the vllm route they are per engine worker (one per tensor-parallel rank), so a replica
    # takes tensor_parallel times them. Unset: one CPU per actor; for vLLM, a GPU per TP rank
    resources: dict[str, float] | None = None

    @field_validator("resources")
    @classmethod
    def _non_negative(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        negative = next((name for name, amount in (value or {}).items() if amount < 0), None)
        if negative:
            raise ValueError(f"resource {negative!r} is negative")
        return value

    @model_validator(mode="after")
    def _ray_fields_need_ray(self) -> EngineConfig:
        if self.kind == "local":
            given = sorted(self.model_fields_set - {"kind"})
            if given:
                raise ValueError(f"{given[0]} is for kind: ray (this engine is local)")
        return self


def ray_route(backend: str, base_url: str | list[str] | None) -> str:
    """The Ray route a teacher backend takes (see the module docstring)."""
    if backend == "vllm":
        return ROUTE_VLLM
    if backend == "openai" and not isinstance(base_url, list):
        return ROUTE_HTTP
    return ROUTE_ACTORS
