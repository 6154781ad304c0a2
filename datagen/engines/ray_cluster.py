"""Joining Ray: the one way every route that runs on Ray reaches a cluster.

Teacher calls (`engine.kind: ray`, `datagen.engines.ray_teacher`) and filter shards
(`datagen filter|dedup --engine ray`, `datagen.engines.datatrove_run`) both call `join_ray`.
The address is, in this order: `engine.address` from the config; else the `RAY_ADDRESS`
environment variable (what `ray job submit` sets for a driver); else none, and a Ray instance
is started on this machine (`address="local"`, so a stale `/tmp/ray/ray_current_cluster` is
never joined by accident). Ray is imported here only when a run uses it.

    from datagen.engines.ray_cluster import join_ray
    started = join_ray(config.engine.address)   # True: this call started or joined Ray; shut it down after
"""

from __future__ import annotations

import os

from datagen.errors import ConfigError, DatagenError

LOCAL = "local"  # ray.init's address for "start a Ray instance on this machine"


def import_ray():
    """`ray` and `ray.data`, or one clear line saying how to install them."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError("the ray engine needs Ray Data: pip install 'datagen[ray]'") from None
    return ray


def ray_address(address: str | None = None) -> tuple[str, str]:
    """(address, where it came from): `engine.address`, else RAY_ADDRESS, else a local Ray."""
    if address:
        return address, "engine.address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    return LOCAL, "a Ray started on this machine"


def join_ray(address: str | None = None) -> bool:
    """Join the cluster `ray_address` names (or start a local Ray), unless this process is in
    Ray already. Returns whether this call did it (the caller then shuts Ray down when done)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    target, origin = ray_address(address)
    try:
        ray.init(address=target, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    except ConnectionError as error:
        raise DatagenError(f"{origin}: cannot reach the Ray cluster at {target}: {error}") from None
    return True


def alive_nodes() -> int:
    """How many nodes of the joined Ray cluster are alive."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))
