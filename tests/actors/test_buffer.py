"""TrajectoryBuffer: backpressure, staleness, Arrow round trip, spill/restore, accounting, and under Ray."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.buffer import (
    CONSUMED_LOG,
    DROP_STALE,
    GROUP_SCHEMA,
    PROMPT_TYPE,
    STAT_DEPTH,
    STAT_DROPPED_PREFIX,
    STAT_GOT,
    STAT_KEPT_STALE,
    STAT_PUT,
    STAT_PUT_TIMEOUTS,
    STAT_PUT_WAIT_S,
    STAT_PUTS_WAITING,
    STAT_SPILL_FAILURES,
    STAT_STALENESS_PREFIX,
    TARGET_TYPE,
    TRAJECTORY_TYPE,
    BufferAccounting,
    BufferConfig,
    IncompleteGroupError,
    TrajectoryBuffer,
    batch_to_groups,
    groups_to_batch,
)
from actors.types import PromptGroup, Target, Trajectory, TrajectoryGroup

WAIT_S = 10.0  # generous bound on waiting for another thread; never reached when the code is right


def make_group(gid: str, *, version: int = 0, n: int = 2) -> TrajectoryGroup:
    """A scored group in which every field holds a non-default value."""
    target = Target(present=True, category="moth", boxes=[[1.5, 2.0, 30.25, 40.0], [0.0, 0.0, 1.0, 1.0]],
                    width=112, height=96)
    prompt = PromptGroup(group_id=gid, prompt_id=f"row-{gid}", task="camo", difficulty="hard",
                         question="Where is the moth?", image=b"\x89PNG\x00\xff" + gid.encode(), target=target, stage=2)
    trajectories = [
        Trajectory(
            sample_index=i,
            prompt_ids=[1, 2, 151655, 2**31 - 1],
            completion_ids=[5, 6, 7],
            behaviour_logprobs=[-0.1 * (i + 1), 0.0, -1e-12],
            loss_mask=[1, 0, 1],
            completion_text=f"<think>é {i}</think><answer>{{}}</answer>",
            zoom_images=[b"\x00crop\x01", b""],
            zoom_boxes=[[3.0, 4.0, 50.5, 60.0]],
            finish_reason="length" if i else "stop",
            rewards={"format": 1.0, "iou": 0.125 * i},
            reward=0.3 + i,
            parse_failure="no_answer" if i else None,
        )
        for i in range(n)
    ]
    return TrajectoryGroup(prompt=prompt, trajectories=trajectories, policy_version=version, worker_id="w1",
                           timings={"generate": 1.25, "reward": 0.01})


def make_plain_group(gid: str) -> TrajectoryGroup:
    """Nulls and empty collections where types.py allows them."""
    prompt = PromptGroup(group_id=gid, prompt_id="p", task="detect", difficulty="easy", question="", image=b"",
                         target=Target(present=False, category=None, boxes=[], width=1, height=1), stage=0)
    traj = Trajectory(sample_index=0, prompt_ids=[], completion_ids=[], behaviour_logprobs=[], loss_mask=[],
                      completion_text="", rewards={"format": 0.0})
    return TrajectoryGroup(prompt=prompt, trajectories=[traj], policy_version=0)


# ---- Arrow -----------------------------------------------------------------------------------------
def test_schema_covers_every_field_of_the_types():
    # A field added to actors/types.py without a column would silently vanish in the spill.
    assert TARGET_TYPE.names == [f.name for f in dataclasses.fields(Target)]
    assert PROMPT_TYPE.names == [f.name for f in dataclasses.fields(PromptGroup)]
    assert TRAJECTORY_TYPE.names == [f.name for f in dataclasses.fields(Trajectory)]
    assert GROUP_SCHEMA.names == [f.name for f in dataclasses.fields(TrajectoryGroup)]


def test_arrow_and_parquet_round_trip_every_field(tmp_path):
    groups = [make_group("g0", version=7, n=3), make_plain_group("g1")]
    batch = groups_to_batch(groups)
    assert batch.num_rows == 2
    assert batch_to_groups(batch) == groups
    pq.write_table(pa.Table.from_batches([batch]), tmp_path / "g.parquet")
    back = batch_to_groups(pq.read_table(tmp_path / "g.parquet"))
    assert back == groups
    # dict order of rewards/timings survives (maps, not re-sorted structs)
    assert list(back[0].trajectories[1].rewards) == ["format", "iou"]


def test_token_id_that_does_not_fit_int32_is_an_error_not_a_wrap():
    group = make_group("g")
    group.trajectories[0].completion_ids[0] = 2**31
    with pytest.raises(pa.ArrowInvalid):
        groups_to_batch([group])


# ---- validation ------------------------------------------------------------------------------------
def _break(field: str):
    def apply(group: TrajectoryGroup) -> None:
        t = group.trajectories[1]
        if field == "trajectories":
            group.trajectories = []
        elif field == "group_size":
            group.trajectories.pop()
        elif field == "sample_index":
            t.sample_index = 0
        elif field == "behaviour_logprobs":
            t.behaviour_logprobs.pop()
        elif field == "loss_mask":
            t.loss_mask.append(1)
        elif field == "rewards":
            t.rewards = {}
    return apply


@pytest.mark.parametrize("field", ["trajectories", "group_size", "sample_index", "behaviour_logprobs",
                                   "loss_mask", "rewards"])
def test_incomplete_group_is_rejected_naming_the_field(field):
    buffer = TrajectoryBuffer(BufferConfig(capacity=4, group_size=2))
    group = make_group("g", n=2)
    _break(field)(group)
    with pytest.raises(IncompleteGroupError, match=field):
        buffer.put(group)
    assert buffer.accounting().put == 0 and len(buffer) == 0


def test_duplicate_group_id_is_refused():
    buffer = TrajectoryBuffer(BufferConfig(capacity=4))
    buffer.put(make_group("g"))
    buffer.get(1, learner_version=0)
    with pytest.raises(ValueError, match="already put"):
        buffer.put(make_group("g"))


def test_bad_get_arguments():
    buffer = TrajectoryBuffer(BufferConfig(capacity=4))
    with pytest.raises(ValueError, match="capacity"):
        buffer.get(5, learner_version=0)
    buffer.get(1, learner_version=3, timeout_s=0)
    with pytest.raises(ValueError, match="backwards"):
        buffer.get(1, learner_version=2, timeout_s=0)


def test_config_rejects_unknown_and_out_of_range_fields():
    with pytest.raises(ValueError, match="capacity"):
        BufferConfig(capacity=0)
    with pytest.raises(ValueError, match="stale_policy"):
        BufferConfig(stale_policy="recompute")
    with pytest.raises(ValueError, match="capacty"):
        BufferConfig(capacty=3)


# ---- backpressure ----------------------------------------------------------------------------------
def _wait_until(predicate) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_full_buffer_blocks_the_producer_until_the_learner_gets():
    buffer = TrajectoryBuffer(BufferConfig(capacity=2))
    producer = threading.Thread(target=lambda: [buffer.put(make_group(f"g{i}")) for i in range(3)])
    producer.start()
    _wait_until(lambda: buffer.stats()[STAT_PUTS_WAITING] == 1)
    assert producer.is_alive() and len(buffer) == 2  # the third put waits; nothing was dropped
    got = buffer.get(1, learner_version=0)
    producer.join(WAIT_S)
    assert not producer.is_alive()
    assert [g.group_id for g in got] == ["g0"]
    assert [g.group_id for g in buffer.get(2, learner_version=0)] == ["g1", "g2"]
    assert buffer.accounting().balanced and buffer.accounting().got == 3


def test_learner_get_waits_for_n_groups_put_concurrently():
    buffer = TrajectoryBuffer(BufferConfig(capacity=4))
    result = []
    learner = threading.Thread(target=lambda: result.extend(buffer.get(3, learner_version=0)))
    learner.start()
    for i in range(3):
        buffer.put(make_group(f"g{i}"))
    learner.join(WAIT_S)
    assert [g.group_id for g in result] == ["g0", "g1", "g2"]


def test_put_timeout_raises_and_counts():
    buffer = TrajectoryBuffer(BufferConfig(capacity=1, put_timeout_s=0.02))
    buffer.put(make_group("g0"))
    with pytest.raises(TimeoutError, match="g1"):
        buffer.put(make_group("g1"))
    assert buffer.stats()[STAT_PUT_TIMEOUTS] == 1
    assert buffer.accounting().put == 1  # a refused put is not a silent drop: it was never accepted


def test_get_timeout_returns_what_is_there():
    buffer = TrajectoryBuffer(BufferConfig(capacity=4))
    buffer.put(make_group("g0"))
    assert [g.group_id for g in buffer.get(3, learner_version=0, timeout_s=0.01)] == ["g0"]
    assert buffer.get(3, learner_version=0, timeout_s=0) == []


# ---- staleness -------------------------------------------------------------------------------------
def test_stale_groups_are_dropped_counted_and_never_returned():
    buffer = TrajectoryBuffer(BufferConfig(capacity=8, max_staleness=1))
    for v in range(4):
        buffer.put(make_group(f"v{v}", version=v))
    # learner at 3, bound 1: versions 0 and 1 (< 3 - 1) are stale; 2 (lag 1) and 3 (lag 0) are fresh.
    got = buffer.get(4, learner_version=3, timeout_s=0)
    assert [g.group_id for g in got] == ["v2", "v3"]
    stats = buffer.stats()
    assert stats[STAT_DROPPED_PREFIX + DROP_STALE] == 2
    assert stats[STAT_STALENESS_PREFIX + "0"] == 1 and stats[STAT_STALENESS_PREFIX + "1"] == 1
    assert (stats[STAT_PUT], stats[STAT_GOT], stats[STAT_DEPTH]) == (4, 2, 0)
    assert buffer.accounting().balanced


def test_keep_policy_hands_out_stale_groups_and_counts_them():
    buffer = TrajectoryBuffer(BufferConfig(capacity=8, max_staleness=1, stale_policy="keep"))
    for v in range(4):
        buffer.put(make_group(f"v{v}", version=v))
    assert len(buffer.get(4, learner_version=3)) == 4
    stats = buffer.stats()
    assert stats[STAT_KEPT_STALE] == 2 and stats[STAT_DROPPED_PREFIX + DROP_STALE] == 0
    assert [stats[f"{STAT_STALENESS_PREFIX}{lag}"] for lag in range(4)] == [1, 1, 1, 1]


def test_stale_groups_do_not_hold_capacity_against_a_put():
    buffer = TrajectoryBuffer(BufferConfig(capacity=1, max_staleness=0, put_timeout_s=5.0))
    buffer.get(1, learner_version=5, timeout_s=0)
    buffer.put(make_group("old", version=4))
    buffer.put(make_group("new", version=5))  # does not wait: the stale group makes room
    assert [g.group_id for g in buffer.get(1, learner_version=5)] == ["new"]
    assert buffer.accounting().dropped == {DROP_STALE: 1}


def test_the_buffers_own_counts_reach_the_runs_prometheus_counters():
    """BufferCounters adds what the buffer's cumulative counts gained since the last update, once."""
    from actors.metrics import BufferCounters, RunMetrics

    metrics = RunMetrics()
    counters = BufferCounters(metrics)
    buffer = TrajectoryBuffer(BufferConfig(capacity=1, put_timeout_s=0.05))
    buffer.put(make_group("a"))
    with pytest.raises(TimeoutError):
        buffer.put(make_group("b"))  # full: waits 0.05 s, then is refused

    def value(name):
        return metrics.registry.get_sample_value(name) or 0.0

    counters.update(buffer.stats())
    waited = value("refocus_buffer_put_wait_seconds_total")
    assert waited >= 0.05 and value("refocus_buffer_put_timeouts_total") == 1.0
    counters.update(buffer.stats())  # nothing new: nothing added
    assert value("refocus_buffer_put_wait_seconds_total") == waited and value("refocus_buffer_put_timeouts_total") == 1


# ---- spill and restore -----------------------------------------------------------------------------
def test_spill_restore_returns_each_group_exactly_once(tmp_path):
    config = BufferConfig(capacity=16, max_staleness=1, spill_dir=str(tmp_path))
    first = TrajectoryBuffer(config)
    originals = [make_group(f"g{i}", version=2 if i else 0) for i in range(6)]
    for g in originals:
        first.put(g)
    got_first = first.get(2, learner_version=2)  # g0 (version 0) is dropped stale, g1 and g2 handed out
    assert [g.group_id for g in got_first] == ["g1", "g2"]
    # no close(): a crash. A new buffer on the same directory holds g3..g5, same content.
    second = TrajectoryBuffer.restore(config)
    assert second.accounting() == first.accounting()
    assert second.accounting().held == 3
    got_second = second.get(3, learner_version=2, timeout_s=0)
    assert got_second == originals[3:]
    third = TrajectoryBuffer.restore(config)
    assert len(third) == 0 and third.get(1, learner_version=2, timeout_s=0) == []
    acc = third.accounting()
    assert (acc.put, acc.got, acc.dropped[DROP_STALE], acc.held) == (6, 5, 1, 0) and acc.balanced
    assert not list(tmp_path.glob("groups-*"))  # every spill file's groups have left: files deleted


def test_a_resumed_run_numbers_its_groups_past_every_id_the_restored_buffer_saw(tmp_path):
    """A crash while the learner trains a step: its groups were handed out after the last checkpoint
    (issue counter 2 there). The restored buffer refuses their ids again, and the resumed driver, whose
    sampler draws the same rows, must number its groups past them, not past the held ones only."""
    from deploy.driver import next_issue_counter

    config = BufferConfig(capacity=16, spill_dir=str(tmp_path), spill_every_groups=1)
    first = TrajectoryBuffer(config)
    for gid in ["r0#1", "r1#2", "r2#3", "r3#4", "r4#5"]:
        first.put(make_group(gid))
    first.get(4, learner_version=0)  # r0..r3 go to the learner; the run dies before the next checkpoint
    second = TrajectoryBuffer(config, resume=True)
    assert second.held_ids() == ["r4#5"]
    assert second.seen_ids() == ["r0#1", "r1#2", "r2#3", "r3#4", "r4#5"]
    with pytest.raises(ValueError, match="already put"):
        second.put(make_group("r2#3"))  # what a counter restored from the checkpoint alone would issue
    counter = next_issue_counter(2, second.seen_ids())
    assert counter == 5
    second.put(make_group(f"r2#{counter + 1}"))
    assert next_issue_counter(7, ["a#3", "b#x#4"]) == 7 and next_issue_counter(0, ["b#x#4"]) == 4


def test_restore_keeps_fifo_order_across_files_and_groups_put_after(tmp_path):
    config = BufferConfig(capacity=16, spill_dir=str(tmp_path), spill_every_groups=2)
    first = TrajectoryBuffer(config)
    for i in range(5):
        first.put(make_group(f"g{i}"))
    first.close()  # writes the fifth group, pending in a partial file
    assert len(list(tmp_path.glob("groups-*.parquet"))) == 3
    second = TrajectoryBuffer(config, resume=True)
    second.put(make_group("g5"))
    assert [g.group_id for g in second.get(6, learner_version=0)] == [f"g{i}" for i in range(6)]


def test_unflushed_groups_are_the_documented_loss_window(tmp_path):
    config = BufferConfig(capacity=16, spill_dir=str(tmp_path), spill_every_groups=4)
    first = TrajectoryBuffer(config)
    for i in range(5):
        first.put(make_group(f"g{i}"))
    # crash without flush: the fifth group was never written
    assert [g.group_id for g in TrajectoryBuffer.restore(config).get(5, learner_version=0, timeout_s=0)] == [
        f"g{i}" for i in range(4)]


def test_cut_off_log_line_redelivers_that_group(tmp_path):
    config = BufferConfig(capacity=16, spill_dir=str(tmp_path))
    first = TrajectoryBuffer(config)
    for i in range(3):
        first.put(make_group(f"g{i}"))
    first.get(1, learner_version=0)
    # A crash while get() wrote g1's record: the line is cut, g1's spill file is still there (it is
    # deleted only after the record is written) and that get never returned.
    with open(tmp_path / CONSUMED_LOG, "a") as log:
        log.write('{"id": "g1", "outc')
    restored = TrajectoryBuffer.restore(config)
    assert [g.group_id for g in restored.get(2, learner_version=0, timeout_s=0)] == ["g1", "g2"]
    assert restored.accounting() == BufferAccounting(put=3, got=3, dropped={DROP_STALE: 0}, held=0)
    # the cut line was cleared, so the records written after it are readable: nothing comes back again
    again = TrajectoryBuffer.restore(config)
    assert again.get(1, learner_version=0, timeout_s=0) == [] and again.accounting().got == 3


def _fail_writes(monkeypatch, times: int) -> None:
    """The next ``times`` spill writes fail as on a full disk, after writing part of the file (a full disk
    cannot be made here: the tests run as root, and a tmpfs of a few KiB needs mount rights)."""
    real_write = pq.write_table
    left = [times]

    def write_table(table, where, **kwargs):
        if left[0] > 0:
            left[0] -= 1
            Path(where).write_bytes(b"PAR1 cut")
            raise OSError(28, "No space left on device")
        return real_write(table, where, **kwargs)

    monkeypatch.setattr("actors.buffer.pq.write_table", write_table)


def test_a_failed_spill_write_fails_no_put_and_its_groups_go_into_the_next_file(tmp_path, monkeypatch):
    config = BufferConfig(capacity=16, spill_dir=str(tmp_path), spill_every_groups=2)
    buffer = TrajectoryBuffer(config)
    _fail_writes(monkeypatch, times=1)
    buffer.put(make_group("g0"))
    buffer.put(make_group("g1"))  # its spill write fails: the put still succeeds, g0 and g1 are held
    assert buffer.stats()[STAT_SPILL_FAILURES] == 1 and len(buffer) == 2
    assert not list(tmp_path.glob("groups-*"))  # neither a file nor its cut-off .tmp is left
    buffer.put(make_group("g2"))  # the next spill file holds g0, g1 and g2
    # a crash now loses nothing the failed write held
    restored = TrajectoryBuffer.restore(config)
    assert [g.group_id for g in restored.get(3, learner_version=0, timeout_s=0)] == ["g0", "g1", "g2"]


def test_a_failed_flush_raises_and_a_later_flush_writes_its_groups(tmp_path, monkeypatch):
    config = BufferConfig(capacity=16, spill_dir=str(tmp_path), spill_every_groups=8)
    buffer = TrajectoryBuffer(config)
    buffer.put(make_group("g0"))
    _fail_writes(monkeypatch, times=1)
    with pytest.raises(OSError, match="No space"):
        buffer.flush()  # asked for durability explicitly: the caller hears it failed
    assert [g.group_id for g in TrajectoryBuffer.restore(config).get(1, learner_version=0, timeout_s=0)] == []
    buffer.flush()
    assert [g.group_id for g in TrajectoryBuffer.restore(config).get(1, learner_version=0, timeout_s=0)] == ["g0"]


def test_fresh_buffer_refuses_a_used_spill_dir(tmp_path):
    config = BufferConfig(capacity=4, spill_dir=str(tmp_path), spill_every_groups=1)
    TrajectoryBuffer(config).put(make_group("g"))
    with pytest.raises(ValueError, match="resume"):
        TrajectoryBuffer(config)


def test_a_run_that_stopped_before_holding_a_group_leaves_nothing_to_resume(tmp_path):
    """Every buffer writes an empty record of groups handed out when it opens. A run stopped before any group
    (Ctrl-C while the engines start) left only that: a fresh run there is not refused, early or late; one that
    left groups is refused before any actor starts (``refuse_buffered_run``), not by the buffer actor after."""
    from deploy.run_record import BUFFER_DIR, refuse_buffered_run

    config = BufferConfig(capacity=4, spill_dir=str(tmp_path / BUFFER_DIR), spill_every_groups=1)
    TrajectoryBuffer(config).close()
    assert (tmp_path / BUFFER_DIR / CONSUMED_LOG).read_text() == ""
    refuse_buffered_run(tmp_path, setting="train.output_dir")
    TrajectoryBuffer(config).put(make_group("g"))  # the fresh run
    with pytest.raises(ValueError, match="train.output_dir: .* holds the buffered groups .* pass --resume"):
        refuse_buffered_run(tmp_path, setting="train.output_dir")


# ---- under Ray -------------------------------------------------------------------------------------
def test_buffer_actor_with_two_producers_and_one_consumer_accounts_for_every_group(tmp_path):
    ray = pytest.importorskip("ray")
    per_producer, total = 12, 24
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # capacity 3 << 24 groups: producers block; max_concurrency leaves a thread for the consumer.
        actor_cls = ray.remote(num_cpus=0, max_concurrency=4)(TrajectoryBuffer)
        buffer = actor_cls.remote(BufferConfig(capacity=3, max_staleness=2, spill_dir=str(tmp_path)))

        @ray.remote(num_cpus=0)
        def produce(buf, name: str) -> list[str]:
            ids = []
            for i in range(per_producer):
                group = make_group(f"{name}-{i}", version=i // 4)
                ray.get(buf.put.remote(group))
                ids.append(group.group_id)
            return ids

        @ray.remote(num_cpus=0)
        def consume(buf) -> list[tuple[str, int, int]]:
            received, version = [], 0
            deadline = time.monotonic() + WAIT_S
            while ray.get(buf.stats.remote())[STAT_PUTS_WAITING] == 0:  # let a producer hit the full buffer
                assert time.monotonic() < deadline
                time.sleep(0.01)
            while True:
                acc = ray.get(buf.accounting.remote())
                if acc.put == total and acc.held == 0:
                    return received
                for g in ray.get(buf.get.remote(2, learner_version=version, timeout_s=0.2)):
                    received.append((g.group_id, g.policy_version, version))
                version = min(version + 1, 3)  # the learner advances: late version-0 groups go stale

        producers = [produce.remote(buffer, name) for name in ("a", "b")]
        consumer = consume.remote(buffer)
        put_ids = set(sum(ray.get(producers), []))
        received = ray.get(consumer)
        acc = ray.get(buffer.accounting.remote())
        got_ids = [gid for gid, _, _ in received]
        assert len(put_ids) == total and len(got_ids) == len(set(got_ids)) and set(got_ids) <= put_ids
        assert acc.put == total and acc.got == len(got_ids) and acc.held == 0
        assert acc.got + acc.dropped[DROP_STALE] == total
        assert ray.get(buffer.stats.remote())[STAT_PUT_WAIT_S] > 0  # producers were held back, not refused
        # nothing handed out was beyond the staleness bound at the version it was handed out at
        assert all(learner - policy <= 2 for _, policy, learner in received)
    finally:
        ray.shutdown()


def test_a_resume_without_a_checkpoint_trains_the_restored_groups_and_numbers_past_them(tmp_path):
    """A run that crashed before its first checkpoint (checkpoint_every 0: any crash before the end) left groups
    in its spill directory. ``--resume`` restores them; the driver must enter them in its ledger and issue ids past
    every one the buffer saw, checkpoint or not: before, it did neither, so the resumed run's first put was refused
    as a duplicate and the restored groups reached the learner unknown to the ledger (the real buffer actor and
    ``Driver._restore``; the driver is built bare, as a whole one starts engines and a learner)."""
    ray = pytest.importorskip("ray")
    from deploy.driver import Driver
    from deploy.ledger import GroupLedger

    config = BufferConfig(capacity=8, spill_dir=str(tmp_path / "buffer"), spill_every_groups=1)
    crashed = TrajectoryBuffer(config)
    for gid in ["r0#1", "r1#2", "r2#3"]:
        crashed.put(make_group(gid))
    crashed.get(1, learner_version=0)  # r0#1 went to the learner; the run died in that step
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        driver = object.__new__(Driver)
        driver.out, driver.ledger, driver._issue_counter = tmp_path, GroupLedger(), 0
        driver.buffer = ray.remote(num_cpus=0)(TrajectoryBuffer).remote(config, resume=True)
        driver._restore()
        assert driver._issue_counter == 3
        for group in ray.get(driver.buffer.get.remote(2, learner_version=0, timeout_s=0)):
            driver.ledger.train(group.group_id)  # known to the ledger: issued and generated
        ray.get(driver.buffer.put.remote(make_group(f"r0#{driver._issue_counter + 1}")))  # the next issue
        assert driver.ledger.trained == {"r1#2", "r2#3"}
    finally:
        ray.shutdown()


class FailsFirstSpill(TrajectoryBuffer):
    """Its first spill write fails as on a full disk (in the actor's own process, where a test's monkeypatch
    cannot reach)."""

    failed = False

    def _write_spill(self, seq, entries):
        if FailsFirstSpill.failed:
            return super()._write_spill(seq, entries)
        FailsFirstSpill.failed = True
        real = pq.write_table

        def full_disk(table, where, **kwargs):
            raise OSError(28, "No space left on device")

        pq.write_table = full_disk  # this actor's process only; the buffer's own error handling runs
        try:
            return super()._write_spill(seq, entries)
        finally:
            pq.write_table = real


def test_the_run_end_writes_the_groups_a_failed_spill_left_in_memory(tmp_path):
    """The last put of a run whose spill write failed kept its group in memory until the next spill, which never
    came: a --resume with more steps lost it. The driver flushes the buffer when it shuts down."""
    ray = pytest.importorskip("ray")
    from deploy.driver import Driver

    config = BufferConfig(capacity=8, spill_dir=str(tmp_path / "buffer"), spill_every_groups=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        driver = object.__new__(Driver)  # bare, as above: the buffer is what is tested
        driver.buffer = ray.remote(num_cpus=0)(FailsFirstSpill).remote(config)
        ray.get(driver.buffer.put.remote(make_group("r0#1")))  # its spill write fails; the put does not
        assert ray.get(driver.buffer.stats.remote())[STAT_SPILL_FAILURES] == 1
        driver._flush_buffer()
    finally:
        ray.shutdown()
    restored = TrajectoryBuffer.restore(config)
    assert [g.group_id for g in restored.get(1, learner_version=0, timeout_s=0)] == ["r0#1"]


def test_take_dropped_names_each_stale_group_once():
    from actors.buffer import BufferConfig, TrajectoryBuffer

    buffer = TrajectoryBuffer(BufferConfig(capacity=8, max_staleness=1))
    for gid, version in (("old#1", 0), ("new#2", 2)):
        buffer.put(make_group(gid, version=version))
    assert [g.group_id for g in buffer.get(2, learner_version=2, timeout_s=0)] == ["new#2"]
    assert buffer.take_dropped() == [("old#1", "stale")]
    assert buffer.take_dropped() == []
