"""TrajectoryBuffer: a bounded, versioned, staleness-filtered queue of scored groups that spills to disk.

Rollout/reward workers ``put`` complete ``TrajectoryGroup``s; the learner ``get``s them in FIFO order.

Concurrency: a plain class guarded by one ``threading.Condition`` lock (two conditions on it: "not
full" for producers, "not empty" for the learner). Threads rather than asyncio so that the class
stays synchronous and testable without Ray or an event loop, and because Ray's threaded actors
(``ray.remote(max_concurrency=K)(TrajectoryBuffer)``) run each call on its own thread: a ``put`` that
finds the buffer full blocks its thread (and so its producer, which is waiting on the call) until
the learner's ``get`` frees space on another thread. K must exceed the number of producers that can
block at once, or the learner's ``get`` finds no free thread and waits behind them: use
``max_concurrency=num_producers + 2``.

Storage: each held group is one Arrow record batch (one row; token ids as int32 arrays are ~8×
smaller than Python int lists). With ``spill_dir`` set, groups are also written to Parquet files
(``groups-<seq>.parquet``) and every group that leaves the buffer is appended to ``consumed.jsonl``
(before ``get`` returns), so ``TrajectoryBuffer(config, resume=True)`` after a crash or restart holds
exactly the groups that were put and never handed out or dropped — none is returned twice.
Durability is against a process crash (files are renamed into place, the log is flushed), not a
power loss (no fsync). A file whose groups have all left is deleted.

Accounting: every group ever put is handed out, dropped (by reason) or still held; ``accounting()``
reconciles exactly, across a restore too.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from actors.types import PromptGroup, Target, Trajectory, TrajectoryGroup

logger = logging.getLogger(__name__)

# Metric names of ``TrajectoryBuffer.stats()``.
STAT_DEPTH = "buffer/depth"  # groups held now
STAT_OLDEST_AGE_S = "buffer/oldest_age_s"  # seconds since the oldest held group was put (0 when empty)
STAT_PUT = "buffer/put"  # groups accepted, ever (restored groups count as put)
STAT_GOT = "buffer/got"  # groups handed out to the learner
STAT_DROPPED_PREFIX = "buffer/dropped/"  # + drop reason: groups discarded, never handed out
STAT_KEPT_STALE = "buffer/kept_stale"  # stale groups handed out anyway (stale_policy "keep")
STAT_STALENESS_PREFIX = "buffer/staleness/"  # + lag: handed-out groups by learner_version - policy_version
STAT_PUTS_WAITING = "buffer/puts_waiting"  # producers blocked on a full buffer now
STAT_PUT_WAIT_S = "buffer/put_wait_s"  # total seconds producers spent blocked (backpressure)
STAT_PUT_TIMEOUTS = "buffer/put_timeouts"  # puts refused after waiting put_timeout_s
STAT_SPILL_FAILURES = "buffer/spill_failures"  # spill files that could not be written (their groups retried later)

DROP_STALE = "stale"  # policy_version < learner_version - max_staleness
DROP_REASONS = (DROP_STALE,)
OUTCOME_GOT = "got"

SPILL_PREFIX = "groups-"
SPILL_SUFFIX = ".parquet"
CONSUMED_LOG = "consumed.jsonl"
PUT_TIME_COLUMN = "buffer_put_time"  # unix seconds; spill files only, so ages survive a restart


def holds_groups(spill_dir: str | Path) -> bool:
    """Whether ``spill_dir`` holds a buffer's groups: spilled ones, or a record of groups handed out (an empty
    record, which every buffer writes when it opens, says nothing was)."""
    spill_dir = Path(spill_dir)
    log_path = spill_dir / CONSUMED_LOG
    return (any(spill_dir.glob(f"{SPILL_PREFIX}*{SPILL_SUFFIX}"))
            or (log_path.is_file() and log_path.stat().st_size > 0))


class BufferConfig(BaseModel):
    """Bounds and persistence of the trajectory buffer."""

    model_config = ConfigDict(extra="forbid")

    capacity: int = Field(default=64, ge=1, le=1_000_000, description="groups held at most; a put beyond it waits")
    max_staleness: int = Field(
        default=1, ge=0, le=1_000_000,
        description="a group is stale when policy_version < learner_version - max_staleness")
    stale_policy: Literal["drop", "keep"] = Field(
        default="drop",
        description="drop: stale groups are discarded and counted; keep: handed out (the learner recomputes "
        "old log-probs, see is_stale)")
    group_size: int | None = Field(
        default=None, ge=1, le=4096,
        description="samples every group must hold (the rollout n); None accepts any n >= 1")
    spill_dir: str | None = Field(
        default=None, description="directory of the Parquet spill; None keeps groups in memory only")
    spill_every_groups: int = Field(
        default=1, ge=1, le=100_000,
        description="groups per spill file; groups put since the last file are lost in a crash (flush() writes them)")
    put_timeout_s: float | None = Field(
        default=None, gt=0.0,
        description="seconds a put waits on a full buffer before raising TimeoutError; None waits forever")


class IncompleteGroupError(ValueError):
    """A group that is not a complete, scored set of samples: the buffer never holds one."""


@dataclass(frozen=True)
class BufferAccounting:
    """Where every group ever put went. ``balanced`` holds at every instant."""

    put: int
    got: int
    dropped: dict[str, int]
    held: int

    @property
    def balanced(self) -> bool:
        return self.put == self.got + sum(self.dropped.values()) + self.held


def is_stale(policy_version: int, *, learner_version: int, max_staleness: int) -> bool:
    """True when weights ``policy_version`` lag the learner by more than ``max_staleness`` versions."""
    return policy_version < learner_version - max_staleness


def check_complete(group: TrajectoryGroup, *, group_size: int | None = None) -> None:
    """Raise IncompleteGroupError naming the field unless ``group`` is complete and scored.

    Complete: samples 0..n-1 each once (n == group_size when given); per sample, behaviour_logprobs and
    loss_mask as long as completion_ids; rewards filled in by a reward worker.
    """
    gid = group.prompt.group_id
    n = len(group.trajectories)
    if n == 0:
        raise IncompleteGroupError(f"group {gid!r}: trajectories is empty")
    if group_size is not None and n != group_size:
        raise IncompleteGroupError(f"group {gid!r}: trajectories holds {n} samples, group_size is {group_size}")
    indices = sorted(t.sample_index for t in group.trajectories)
    if indices != list(range(n)):
        raise IncompleteGroupError(f"group {gid!r}: sample_index values {indices} are not 0..{n - 1}")
    for t in group.trajectories:
        where = f"group {gid!r} sample {t.sample_index}"
        if len(t.behaviour_logprobs) != len(t.completion_ids):
            raise IncompleteGroupError(f"{where}: behaviour_logprobs has {len(t.behaviour_logprobs)} values "
                                       f"for {len(t.completion_ids)} completion_ids")
        if len(t.loss_mask) != len(t.completion_ids):
            raise IncompleteGroupError(f"{where}: loss_mask has {len(t.loss_mask)} values "
                                       f"for {len(t.completion_ids)} completion_ids")
        if not t.rewards:
            raise IncompleteGroupError(f"{where}: rewards is empty (the group was not scored)")


# ---- Arrow <-> TrajectoryGroup -------------------------------------------------------------------
_BOXES = pa.list_(pa.list_(pa.float64()))
_FLOAT_MAP = pa.map_(pa.string(), pa.float64())  # a map, not a struct: components differ by stage
TARGET_TYPE = pa.struct([
    ("present", pa.bool_()), ("category", pa.string()), ("boxes", _BOXES),
    ("width", pa.int64()), ("height", pa.int64()),
])
PROMPT_TYPE = pa.struct([
    ("group_id", pa.string()), ("prompt_id", pa.string()), ("task", pa.string()), ("difficulty", pa.string()),
    ("question", pa.string()), ("image", pa.binary()), ("target", TARGET_TYPE), ("stage", pa.int64()),
])
TRAJECTORY_TYPE = pa.struct([
    ("sample_index", pa.int64()),
    ("prompt_ids", pa.list_(pa.int32())),  # int32: Arrow raises on an id that does not fit, never wraps
    ("completion_ids", pa.list_(pa.int32())),
    ("behaviour_logprobs", pa.list_(pa.float64())),  # float64: Python floats round-trip exactly
    ("loss_mask", pa.list_(pa.int8())),
    ("completion_text", pa.string()),
    ("zoom_images", pa.list_(pa.binary())),
    ("zoom_boxes", _BOXES),
    ("finish_reason", pa.string()),
    ("rewards", _FLOAT_MAP),
    ("reward", pa.float64()),
    ("parse_failure", pa.string()),
])
GROUP_SCHEMA = pa.schema([
    ("prompt", PROMPT_TYPE),
    ("trajectories", pa.list_(TRAJECTORY_TYPE)),
    ("policy_version", pa.int64()),
    ("worker_id", pa.string()),
    ("timings", _FLOAT_MAP),
])


def groups_to_batch(groups: list[TrajectoryGroup]) -> pa.RecordBatch:
    """One row per group, schema GROUP_SCHEMA (lossless; inverse of ``batch_to_groups``)."""
    return pa.RecordBatch.from_pylist([asdict(g) for g in groups], schema=GROUP_SCHEMA)


def batch_to_groups(batch: pa.RecordBatch | pa.Table) -> list[TrajectoryGroup]:
    """TrajectoryGroups of the GROUP_SCHEMA columns of ``batch`` (extra columns are ignored)."""
    groups = []
    for row in batch.select(GROUP_SCHEMA.names).to_pylist():
        p = row["prompt"]
        prompt = PromptGroup(**{**p, "target": Target(**p["target"])})
        trajectories = [Trajectory(**{**t, "rewards": dict(t["rewards"])}) for t in row["trajectories"]]
        groups.append(TrajectoryGroup(prompt=prompt, trajectories=trajectories, policy_version=row["policy_version"],
                                      worker_id=row["worker_id"], timings=dict(row["timings"])))
    return groups


# ---- the buffer --------------------------------------------------------------------------------------
@dataclass(eq=False)  # compared by identity
class _Held:
    group_id: str
    policy_version: int
    batch: pa.RecordBatch  # one row
    put_time: float  # unix seconds (wall clock, so that ages stay meaningful after a restore)
    spill_file: str | None = None  # the Parquet file holding it, once written
    left: bool = False  # handed out or dropped


@dataclass
class _Counts:
    put: int = 0
    got: int = 0
    dropped: Counter = field(default_factory=Counter)
    kept_stale: int = 0
    staleness: Counter = field(default_factory=Counter)  # lag -> groups handed out
    put_wait_s: float = 0.0
    put_timeouts: int = 0
    spill_failures: int = 0


class TrajectoryBuffer:
    """Bounded FIFO of complete TrajectoryGroups with backpressure, a staleness bound and a disk spill."""

    def __init__(self, config: BufferConfig, *, resume: bool = False) -> None:
        """With ``resume`` the groups left in ``config.spill_dir`` by a previous buffer are held again.

        Without it a spill_dir that holds a previous buffer's files is refused (starting over would
        silently abandon those groups); point a fresh run at an empty or new directory.
        """
        self._config = config
        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)
        self._not_empty = threading.Condition(self._lock)
        self._held: deque[_Held] = deque()
        self._ids_seen: set[str] = set()  # every group id ever put: a second put of one is refused
        self._counts = _Counts()
        self._dropped_ids: list[tuple[str, str]] = []  # (group id, reason) not yet taken by the driver
        self._learner_version: int | None = None  # highest seen in get()
        self._puts_waiting = 0
        self._pending: list[_Held] = []  # put but not yet written to a spill file
        self._file_remaining: dict[str, int] = {}  # spill file -> its groups still held
        self._next_seq = 0
        self._log = None
        if config.spill_dir is not None:
            self._open_spill(Path(config.spill_dir), resume=resume)
        elif resume:
            raise ValueError("resume=True needs BufferConfig.spill_dir")

    @classmethod
    def restore(cls, config: BufferConfig) -> TrajectoryBuffer:
        """A buffer holding the groups in ``config.spill_dir`` not yet handed out or dropped."""
        return cls(config, resume=True)

    # ---- producers ----
    def put(self, group: TrajectoryGroup) -> None:
        """Add a complete group; blocks while the buffer is full (raises TimeoutError after put_timeout_s)."""
        check_complete(group, group_size=self._config.group_size)
        batch = groups_to_batch([group])  # converted outside the lock
        gid = group.group_id
        timeout = self._config.put_timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        to_spill: tuple[int, list[_Held]] | None = None
        with self._lock:
            self._refuse_duplicate(gid)
            if len(self._held) >= self._config.capacity:
                self._drop_stale_locked()  # dead groups must not hold capacity against live ones
            if len(self._held) >= self._config.capacity:
                self._wait_for_space_locked(deadline, gid)
                self._refuse_duplicate(gid)  # another producer may have put the same id meanwhile
            entry = _Held(gid, group.policy_version, batch, time.time())
            self._held.append(entry)
            self._ids_seen.add(gid)
            self._counts.put += 1
            if self._log is not None:
                self._pending.append(entry)
                if len(self._pending) >= self._config.spill_every_groups:
                    to_spill = self._take_pending_locked()
            self._not_empty.notify_all()
        if to_spill is not None:
            # The group is held (and may already be handed out): a failed write must not fail the put, or the
            # producer's retry would be refused as a duplicate. Its groups wait for the next spill file.
            try:
                self._write_spill(*to_spill)
            except OSError as e:
                logger.error("buffer: spill file %d could not be written (%s); its %d groups stay in memory "
                             "and are written with the next spill file", to_spill[0], e, len(to_spill[1]))

    def _refuse_duplicate(self, gid: str) -> None:
        if gid in self._ids_seen:
            raise ValueError(f"group_id {gid!r} was already put into this buffer (group ids must be unique)")

    def _wait_for_space_locked(self, deadline: float | None, gid: str) -> None:
        start = time.monotonic()
        self._puts_waiting += 1
        try:
            while len(self._held) >= self._config.capacity:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._counts.put_timeouts += 1
                    raise TimeoutError(f"buffer full ({self._config.capacity} groups) for put_timeout_s="
                                       f"{self._config.put_timeout_s}; group {gid!r} was not added")
                self._not_full.wait(remaining)
                self._drop_stale_locked()
        finally:
            self._puts_waiting -= 1
            self._counts.put_wait_s += time.monotonic() - start

    # ---- the learner ----
    def get(self, n: int, *, learner_version: int, timeout_s: float | None = None) -> list[TrajectoryGroup]:
        """Up to ``n`` groups, oldest first: exactly ``n`` once that many fresh groups are held.

        Waits at most ``timeout_s`` (None: until ``n`` are there) and then returns what is held, maybe
        none. Groups stale for ``learner_version`` are dropped (stale_policy "drop") and never returned.
        ``learner_version`` must not decrease between calls.
        """
        if not 1 <= n <= self._config.capacity:
            raise ValueError(f"n must be in 1..capacity={self._config.capacity}, got {n}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            if self._learner_version is not None and learner_version < self._learner_version:
                raise ValueError(f"learner_version went backwards: {learner_version} < {self._learner_version}")
            self._learner_version = learner_version
            self._drop_stale_locked()
            while len(self._held) < n:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._not_empty.wait(remaining)
                self._drop_stale_locked()
            taken = [self._held.popleft() for _ in range(min(n, len(self._held)))]
            for entry in taken:
                lag = learner_version - entry.policy_version
                self._counts.staleness[lag] += 1
                self._counts.kept_stale += lag > self._config.max_staleness
                self._counts.got += 1
                self._record_outcome_locked(entry, OUTCOME_GOT)
            if taken:
                self._not_full.notify_all()
        if not taken:
            return []
        return batch_to_groups(pa.Table.from_batches([e.batch for e in taken], schema=GROUP_SCHEMA))

    def _drop_stale_locked(self) -> None:
        if self._config.stale_policy != "drop" or self._learner_version is None or not self._held:
            return
        keep = deque()
        for entry in self._held:
            if is_stale(entry.policy_version, learner_version=self._learner_version,
                        max_staleness=self._config.max_staleness):
                self._counts.dropped[DROP_STALE] += 1
                self._dropped_ids.append((entry.group_id, DROP_STALE))
                self._record_outcome_locked(entry, DROP_STALE)
            else:
                keep.append(entry)
        if len(keep) != len(self._held):
            self._held = keep
            self._not_full.notify_all()

    # ---- observation ----
    def held_ids(self) -> list[str]:
        """Ids of the groups held now, oldest first (after a restore: what the previous buffer left)."""
        with self._lock:
            return [entry.group_id for entry in self._held]

    def seen_ids(self) -> list[str]:
        """Ids of every group ever put, held or gone (after a restore: the previous buffer's too), sorted.
        A producer that numbers its groups takes its next number past these: the buffer refuses an id twice."""
        with self._lock:
            return sorted(self._ids_seen)

    def take_dropped(self) -> list[tuple[str, str]]:
        """The (group id, reason) of every group dropped since the last call: the driver settles them."""
        with self._lock:
            dropped, self._dropped_ids = self._dropped_ids, []
        return dropped

    def stats(self) -> dict[str, float]:
        """Gauges and counters under the STAT_* names (staleness histogram: one key per lag seen)."""
        with self._lock:
            out = {
                STAT_DEPTH: len(self._held),
                STAT_OLDEST_AGE_S: time.time() - self._held[0].put_time if self._held else 0.0,
                STAT_PUT: self._counts.put,
                STAT_GOT: self._counts.got,
                STAT_KEPT_STALE: self._counts.kept_stale,
                STAT_PUTS_WAITING: self._puts_waiting,
                STAT_PUT_WAIT_S: self._counts.put_wait_s,
                STAT_PUT_TIMEOUTS: self._counts.put_timeouts,
                STAT_SPILL_FAILURES: self._counts.spill_failures,
            }
            out.update({STAT_DROPPED_PREFIX + reason: self._counts.dropped[reason] for reason in DROP_REASONS})
            out.update({f"{STAT_STALENESS_PREFIX}{lag}": c for lag, c in sorted(self._counts.staleness.items())})
            return out

    def accounting(self) -> BufferAccounting:
        with self._lock:
            return BufferAccounting(put=self._counts.put, got=self._counts.got,
                                    dropped={r: self._counts.dropped[r] for r in DROP_REASONS}, held=len(self._held))

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    # ---- spill ----
    def flush(self) -> None:
        """Write groups put since the last spill file (no-op without spill_dir).

        Raises OSError when the file cannot be written; its groups stay held and pending, so a later flush or
        spill writes them."""
        with self._lock:
            to_spill = self._take_pending_locked() if self._pending else None
        if to_spill is not None:
            self._write_spill(*to_spill)

    def close(self) -> None:
        """Flush and close the consumed log; the buffer is not usable afterwards."""
        self.flush()
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None

    def _open_spill(self, spill_dir: Path, *, resume: bool) -> None:
        spill_dir.mkdir(parents=True, exist_ok=True)
        self._spill_dir = spill_dir
        files = sorted(spill_dir.glob(f"{SPILL_PREFIX}*{SPILL_SUFFIX}"))
        log_path = spill_dir / CONSUMED_LOG
        if not resume and holds_groups(spill_dir):
            raise ValueError(f"spill_dir {spill_dir} holds a previous buffer's groups: resume that run (refocus "
                             f"train --resume; TrajectoryBuffer(config, resume=True)) or start in an empty "
                             f"directory (another train.output_dir)")
        if resume:
            self._load_spill(files, log_path)
        self._log = open(log_path, "a" if resume else "w", encoding="utf-8")

    def _load_spill(self, files: list[Path], log_path: Path) -> None:
        consumed: dict[str, str] = {}
        if log_path.exists():
            text = log_path.read_bytes()
            if text and not text.endswith(b"\n"):
                # A crash cut the last record while get() wrote it: that get never returned, so the
                # group is still to be handed out. Cut the fragment, or the next record would join it.
                text = text[: text.rfind(b"\n") + 1]
                logger.warning("%s: cut-off last record removed", log_path)
                with open(log_path, "r+b") as log:
                    log.truncate(len(text))
            for line in text.decode("utf-8").splitlines():
                record = json.loads(line)
                consumed[record["id"]] = record["outcome"]
        for path in files:
            table = pq.read_table(path).combine_chunks()
            batches = table.to_batches()
            rows = [b.slice(i, 1) for b in batches for i in range(b.num_rows)]
            remaining = 0
            for row in rows:
                gid = row.column("prompt")[0]["group_id"].as_py()
                if gid in consumed or gid in self._ids_seen:
                    continue
                version = row.column("policy_version")[0].as_py()
                put_time = row.column(PUT_TIME_COLUMN)[0].as_py()
                group_batch = pa.RecordBatch.from_arrays([row.column(n) for n in GROUP_SCHEMA.names],
                                                         schema=GROUP_SCHEMA)
                self._held.append(_Held(gid, version, group_batch, put_time, spill_file=path.name))
                self._ids_seen.add(gid)
                remaining += 1
            if remaining:
                self._file_remaining[path.name] = remaining
            else:
                path.unlink()
            self._next_seq = max(self._next_seq, int(path.name[len(SPILL_PREFIX):-len(SPILL_SUFFIX)]) + 1)
        for gid, outcome in consumed.items():
            self._ids_seen.add(gid)
            if outcome == OUTCOME_GOT:
                self._counts.got += 1
            else:
                self._counts.dropped[outcome] += 1
        self._counts.put = len(consumed) + len(self._held)
        for tmp in self._spill_dir.glob("*.tmp"):
            tmp.unlink()  # a spill file cut off by a crash: its groups were never acknowledged as put
        logger.info("restored %d groups from %s (%d consumed before)",
                    len(self._held), self._spill_dir, len(consumed))
        if len(self._held) > self._config.capacity:  # a resume may lower train.buffer_capacity
            logger.warning("the restored buffer holds %d groups, above its capacity of %d: puts wait until the "
                           "learner has taken it below", len(self._held), self._config.capacity)

    def _take_pending_locked(self) -> tuple[int, list[_Held]]:
        seq, entries = self._next_seq, self._pending
        self._next_seq += 1
        self._pending = []
        return seq, entries

    def _write_spill(self, seq: int, entries: list[_Held]) -> None:
        """Write ``entries`` still held to spill file ``seq`` (outside the lock: gets go on meanwhile)."""
        with self._lock:
            entries = [e for e in entries if not e.left]
        if not entries:
            return
        name = f"{SPILL_PREFIX}{seq:010d}{SPILL_SUFFIX}"
        table = pa.Table.from_batches([e.batch for e in entries], schema=GROUP_SCHEMA)
        table = table.append_column(PUT_TIME_COLUMN, pa.array([e.put_time for e in entries], pa.float64()))
        tmp = self._spill_dir / (name + ".tmp")
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, self._spill_dir / name)  # atomic: a file is either whole or absent
        except OSError:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._counts.spill_failures += 1
                # Ahead of groups put meanwhile, into the next spill file (a restart holds them after the groups
                # of files written in between: FIFO order then bends, nothing is lost).
                self._pending[:0] = [e for e in entries if not e.left]
            raise
        with self._lock:
            # Groups handed out while the file was written are already in the consumed log.
            still_held = [e for e in entries if not e.left]
            for e in still_held:
                e.spill_file = name
            if still_held:
                self._file_remaining[name] = len(still_held)
            else:
                (self._spill_dir / name).unlink()

    def _record_outcome_locked(self, entry: _Held, outcome: str) -> None:
        """Log that ``entry`` left the buffer (before the caller returns it) and release its spill file."""
        entry.left = True
        if self._log is None:
            return
        self._log.write(json.dumps({"id": entry.group_id, "outcome": outcome}) + "\n")
        self._log.flush()
        if entry.spill_file is not None:
            self._file_remaining[entry.spill_file] -= 1
            if self._file_remaining[entry.spill_file] == 0:
                del self._file_remaining[entry.spill_file]
                (self._spill_dir / entry.spill_file).unlink()
