"""One request and token budget per API account for every process on this machine.

A configured `requests_per_minute` / `tokens_per_minute` is the provider's limit for the key,
so it is the whole run's limit, not each process's: the datatrove shards of `datagen filter
--engine datatrove --tasks 64` with the judge, the replicas of a Ray run on one node, and a
second run started beside the first all draw from one token bucket. The bucket is a small JSON
file (tokens left, when) under an exclusive `fcntl.flock`, in `rate/` under the teacher's cache
folder, named by a hash of the base URLs and the key's variable name (never the key).

The bucket holds `burst_s` seconds of the rate (at least one request's worth): providers
enforce per-minute limits over shorter windows (OpenAI: 60,000 a minute may be enforced as
1,000 a second), so a minute's worth sent at once can be refused while "within the limit".
A take larger than the bucket waits for a full bucket and leaves a debt the refill repays, so
the long-run rate holds for any request size.

flock works between processes of one machine; on a network filesystem it may not, so several
machines do not share a bucket (see the README's rate-limit section).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

BURST_S = 1.0


class SharedBucket:
    """A token bucket at `path`, refilled at `per_minute` a minute, shared by every process
    that opens the same path."""

    def __init__(self, path: Path, per_minute: float, burst_s: float = BURST_S):
        self.path = path
        self.rate = per_minute / 60.0
        self.capacity = max(self.rate * burst_s, 1.0)
        path.parent.mkdir(parents=True, exist_ok=True)

    def _update(self, change) -> float:
        """Under the lock: refill, apply `change(tokens) -> (tokens, result)`, store; the result."""
        with open(self.path, "a+", encoding="utf-8") as file:
            fcntl.flock(file, fcntl.LOCK_EX)
            try:
                file.seek(0)
                text = file.read()
                now = time.time()
                state = json.loads(text) if text.strip() else {"tokens": self.capacity, "at": now}
                tokens = min(self.capacity, state["tokens"] + max(0.0, now - state["at"]) * self.rate)
                tokens, result = change(tokens)
                file.seek(0)
                file.truncate()
                file.write(json.dumps({"tokens": tokens, "at": now}))
                file.flush()
            finally:
                fcntl.flock(file, fcntl.LOCK_UN)
        return result

    def try_take(self, amount: float) -> float:
        """Take `amount` now and return 0, or take nothing and return the seconds to wait."""
        needed = min(amount, self.capacity)  # a bigger take waits for a full bucket, then owes the rest

        def take(tokens: float) -> tuple[float, float]:
            if tokens >= needed:
                return tokens - amount, 0.0
            return tokens, (needed - tokens) / self.rate

        return self._update(take)

    async def acquire(self, amount: float) -> None:
        while True:
            wait = self.try_take(amount)
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    def settle(self, estimated: float, actual: float) -> None:
        """Correct an estimate once the real usage is known (may leave a debt)."""
        self._update(lambda tokens: (min(self.capacity, tokens + estimated - actual), 0.0))


def bucket_path(cache_dir: Path, base_urls: Sequence[str], api_key_env: str, unit: str) -> Path:
    """Where the `unit` ("requests" or "tokens") bucket of one account lives."""
    account = hashlib.sha256(json.dumps([sorted(base_urls), api_key_env]).encode()).hexdigest()[:16]
    return cache_dir / "rate" / f"{account}.{unit}.json"
