"""A hard spending cap: no request is sent that could take the run past `teacher.max_cost`.

Before a teacher call sends anything, each request not in the cache reserves its worst cost
at the configured prices: an upper bound on its prompt tokens (its UTF-8 bytes; a token is at
least one byte in the byte-level BPE vocabularies that price by token, plus a template
allowance per message) and its full `max_tokens`. A request whose reservation would pass the
cap is not sent; once the replies of those that fit are in (and cached), the run stops with
`SpendingCapReached`, one line with the spend. On each reply the reservation is replaced by
its real cost.

A request retried after a timeout or a dropped connection runs under its one reservation, but
the provider may bill each attempt; the cap cannot see that (see the README).

The ledger is a small JSON file beside the run's output (`raw.jsonl` -> `raw.spend.json`), so
the spend is the run's over all its teachers (the judge, responders) and over resumes: a run
stopped at its cap and started again with a higher `--max-cost` goes on from what it spent,
and nothing answered is paid again (the cache). It is read and written under `fcntl.flock`,
so processes of one machine could share it.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import TYPE_CHECKING

from datagen.errors import ConfigError, DatagenError
from datagen.io import atomic_write_text
from datagen.teachers.batch_api import BATCH_BACKEND

if TYPE_CHECKING:
    from datagen.teachers.base import Request
    from datagen.teachers.teacher import PriceTable, TeacherConfig

TEMPLATE_TOKENS_PER_MESSAGE = 16  # role markers and separators a chat template adds


class SpendingCapReached(DatagenError):
    """The next request could pass the cap: the run stops; a higher cap resumes it."""


def worst_cost(request: Request, prices: PriceTable) -> float:
    """What `request` can cost at most: every prompt byte a token, and all of max_tokens."""
    prompt = sum(len(content.encode("utf-8")) + TEMPLATE_TOKENS_PER_MESSAGE for _role, content in request.messages)
    prompt += len((request.prefix or "").encode("utf-8"))
    return prices.cost(prompt, request.params.max_tokens)


class SpendingLedger:
    """The run's spend (`spent`, real costs) and reservations in flight, in one locked file."""

    def __init__(self, path: Path, limit: float, fresh: bool = False):
        """`fresh`: a run starts (its driver, once). Reservations a killed run left were
        requests in flight, which the provider may have billed: they become spend."""
        self.path, self.limit = path, limit
        if fresh:
            self._update(lambda state: ({"spent": state["spent"] + state["reserved"], "reserved": 0.0}, None))

    def _update(self, change):
        """Read, `change(state) -> (state, result)`, write; under a lock on a file of its own,
        and written by rename, so a kill mid-write cannot lose the spend."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a", encoding="utf-8") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
                state, result = change(json.loads(text) if text.strip() else {"spent": 0.0, "reserved": 0.0})
                atomic_write_text(self.path, json.dumps(state))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return result

    @property
    def spent(self) -> float:
        return self._update(lambda state: (state, state["spent"]))

    def reserve(self, amount: float) -> bool:
        """Hold `amount` for a request about to be sent; False when it could pass the cap."""

        def hold(state):
            if state["spent"] + state["reserved"] + amount > self.limit:
                return state, False
            return {**state, "reserved": state["reserved"] + amount}, True

        return self._update(hold)

    def settle(self, reserved: float, actual: float) -> None:
        """A reply arrived: its reservation becomes its real cost (0 for a failed request)."""
        self._update(lambda state: ({"spent": state["spent"] + actual,
                                     "reserved": max(0.0, state["reserved"] - reserved)}, None))

    def stop(self, next_cost: float) -> SpendingCapReached:
        return SpendingCapReached(
            f"spending cap {self.limit:g} reached: {self.spent:.4f} spent by this run (all teachers, resumes "
            f"included; {self.path}), and the next request could cost up to {next_cost:.4f}; rerun with a "
            f"higher --max-cost to go on (every answered request comes from the cache)")


def check_priced(config: TeacherConfig, backend: str, who: str) -> None:
    """Under a cap, an API teacher without prices is one line before anything is sent: what it
    spends is unknown. A local or vLLM teacher costs nothing."""
    if config.billed_prices is None and backend in ("openai", BATCH_BACKEND):
        raise ConfigError(f"teacher.max_cost: {who} has no prices (teacher.prices), so what it spends is unknown")
