"""Exact accounting of prompt groups through a run: nothing lost, nothing counted twice.

Every group the driver issues ends in exactly one of: trained, dropped (by reason), or still somewhere
in flight when the run stops (generating, scoring, in the buffer, in the no-signal pool). The ledger
tracks group ids, not just counts, so a duplicate (e.g. a retried task whose first try also
returned) is caught as an error rather than silently counted twice.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# Drop reasons (metric label values).
DROP_STALE = "stale"  # policy version lagged the learner by more than max_staleness
DROP_NO_SIGNAL = "no_signal"  # every sample of the group got the same reward
DROP_BAD_PROMPT = "bad_prompt"  # the rollout worker could not use the prompt (e.g. corrupt image)
DROP_SHUTDOWN = "shutdown"  # still in flight when the run ended


class LedgerError(RuntimeError):
    """A group moved twice, or from a state it was not in: a bug, never ignored."""


@dataclass
class GroupLedger:
    issued: set[str] = field(default_factory=set)
    generated: set[str] = field(default_factory=set)
    trained: set[str] = field(default_factory=set)
    dropped: dict[str, str] = field(default_factory=dict)  # group id → reason
    reissued: Counter = field(default_factory=Counter)  # group id → times re-issued after a worker death

    def issue(self, group_id: str) -> None:
        if group_id in self.issued:
            raise LedgerError(f"group {group_id} issued twice")
        self.issued.add(group_id)

    def reissue(self, group_id: str) -> None:
        self._require_open(group_id)
        if group_id in self.generated:
            raise LedgerError(f"group {group_id} re-issued after it was generated")
        self.reissued[group_id] += 1

    def generate(self, group_id: str) -> None:
        self._require_open(group_id)
        if group_id in self.generated:
            raise LedgerError(f"group {group_id} generated twice")
        self.generated.add(group_id)

    def train(self, group_id: str) -> None:
        self._settle(group_id)
        self.trained.add(group_id)

    def drop(self, group_id: str, reason: str) -> None:
        self._settle(group_id, allow_ungenerated=reason in (DROP_BAD_PROMPT, DROP_SHUTDOWN))
        self.dropped[group_id] = reason

    def _settle(self, group_id: str, *, allow_ungenerated: bool = False) -> None:
        self._require(group_id, self.issued, "issued")
        if not allow_ungenerated:
            self._require(group_id, self.generated, "generated")
        if group_id in self.trained or group_id in self.dropped:
            raise LedgerError(f"group {group_id} settled twice")

    def _require_open(self, group_id: str) -> None:
        """Issued and not settled: a group dropped before it was generated (a bad prompt, the run's end) ends there."""
        self._require(group_id, self.issued, "issued")
        if group_id in self.trained or group_id in self.dropped:
            raise LedgerError(f"group {group_id} moved after it was settled ({self.dropped.get(group_id, 'trained')})")

    @staticmethod
    def _require(group_id: str, states: set[str], name: str) -> None:
        if group_id not in states:
            raise LedgerError(f"group {group_id} was never {name}")

    @property
    def open(self) -> set[str]:
        """Issued and not yet trained or dropped."""
        return self.issued - self.trained - set(self.dropped)

    def summary(self) -> dict:
        return {
            "issued": len(self.issued),
            "generated": len(self.generated),
            "trained": len(self.trained),
            "dropped": dict(Counter(self.dropped.values())),
            "open": len(self.open),
            "reissued": sum(self.reissued.values()),
        }

    def reconciles(self) -> bool:
        """Every issued group is trained, dropped or open; none is both trained and dropped."""
        trained_and_dropped = self.trained & set(self.dropped)
        return not trained_and_dropped and len(self.trained) + len(self.dropped) + len(self.open) == len(self.issued)
