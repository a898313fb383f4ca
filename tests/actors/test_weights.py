"""Weight sync: raw-byte bucket messages, version assembly, the broadcast group, and both transports under Ray."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from actors.weights import (
    BroadcastGroup,
    WeightReceiver,
    WeightReceiverMixin,
    WeightSender,
    WeightSyncConfig,
    bucket_to_message,
    WeightSyncAborted,
    connect_store,
    message_tensors,
    open_store,
    pack_bucket,
    unpack_chunks,
    weights_checksum,
)
from learner.export import WeightBucket, export_weights

WAIT_S = 60.0


def sample_tensors() -> list[tuple[str, torch.Tensor]]:
    """Every dtype class a policy can hold, a scalar and an empty tensor."""
    g = torch.Generator().manual_seed(0)
    return [
        ("f32", torch.randn(3, 5, generator=g)),
        ("bf16", torch.randn(4, 2, generator=g).to(torch.bfloat16)),
        ("f16", torch.randn(7, generator=g).to(torch.float16)),
        ("i64", torch.arange(6).reshape(2, 3)),
        ("bool", torch.tensor([True, False, True])),
        ("scalar", torch.tensor(2.5)),
        ("empty", torch.zeros(0, 4)),
    ]


def assert_identical(a: list[tuple[str, torch.Tensor]], b: list[tuple[str, torch.Tensor]]) -> None:
    assert [n for n, _ in a] == [n for n, _ in b]
    for (name, x), (_, y) in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.cpu(), y.cpu()), name


# ---- messages and checksums -------------------------------------------------------------------------
def test_bucket_message_round_trip_is_byte_identical_and_zero_copy():
    tensors = sample_tensors()
    message = bucket_to_message(WeightBucket(version=3, index=1, is_last=True, tensors=tensors))
    m = message.manifest
    assert (m.version, m.index, m.is_last) == (3, 1, True)
    assert m.dtypes[:2] == ["float32", "bfloat16"] and m.shapes[5] == [] and not any(m.packed)
    assert message.num_bytes == sum(t.numel() * t.element_size() for _, t in tensors)
    # without packing every chunk aliases its tensor's memory: no copy before ray.put
    assert all(c.ctypes.data == t.data_ptr() for c, (_, t) in zip(message.chunks, tensors) if t.numel())
    back = message_tensors(message)
    assert_identical(back, tensors)
    assert back[0][1].data_ptr() == tensors[0][1].data_ptr()  # and back again


def test_small_tensors_share_one_aligned_chunk():
    tensors = sample_tensors()
    # under 32 bytes: bf16 (16), f16 (14), bool (3), scalar (4), empty (0) packed; f32 (60), i64 (48) alone
    message = bucket_to_message(WeightBucket(0, 0, True, tensors), pack_below_bytes=32)
    assert message.manifest.packed == [False, True, True, False, True, True, True]
    # packed chunk: offsets 0, 16, 32, 48, 64 (each rounded up to 16 bytes), 64 bytes in all
    assert [c.nbytes for c in message.chunks] == [64, 60, 48]
    assert_identical(message_tensors(message), tensors)  # the scalar float32 at byte 48 views cleanly


def _flat_bucket(tensors, *, gap: int = 0) -> WeightBucket:
    """A bucket whose tensors view one uint8 buffer at 16-byte-aligned offsets (+ ``gap`` bytes each)."""
    sizes = [t.numel() * t.element_size() for _, t in tensors]
    offsets = [sum(-(-s // 16) * 16 + gap for s in sizes[:i]) for i in range(len(sizes))]
    flat = torch.zeros(offsets[-1] + -(-sizes[-1] // 16) * 16, dtype=torch.uint8)
    views = []
    for (name, t), offset, size in zip(tensors, offsets, sizes):
        view = torch.empty(t.shape, dtype=t.dtype) if size == 0 else flat[offset:offset + size].view(t.dtype).view(t.shape)
        view.copy_(t)
        views.append((name, view))
    return WeightBucket(0, 0, True, views, flat=flat)


def test_a_flat_bucket_is_one_chunk_without_a_copy():
    bucket = _flat_bucket(sample_tensors())
    message = bucket_to_message(bucket)
    assert all(message.manifest.packed) and len(message.chunks) == 1
    assert message.chunks[0].ctypes.data == bucket.flat.data_ptr()  # the buffer itself goes to ray.put
    assert_identical(message_tensors(message), sample_tensors())
    # a buffer whose tensors do not sit at the packed offsets is not trusted: per-tensor chunks as usual
    shifted = bucket_to_message(_flat_bucket(sample_tensors(), gap=16))
    assert not any(shifted.manifest.packed) and len(shifted.chunks) == len(sample_tensors())
    assert_identical(message_tensors(shifted), sample_tensors())


def test_chunks_that_do_not_match_the_manifest_are_refused():
    manifest, chunks = pack_bucket(WeightBucket(0, 0, True, sample_tensors()), pack_below_bytes=0)
    with pytest.raises(ValueError, match="chunk sizes"):
        unpack_chunks(manifest, chunks[:-1])


def test_checksum_is_order_free_and_sees_one_bit():
    tensors = sample_tensors()
    assert weights_checksum(tensors) == weights_checksum(list(reversed(tensors)))
    flipped = [(n, t.clone()) for n, t in tensors]
    flipped[1][1].view(torch.int16)[0, 0] ^= 1  # lowest mantissa bit of one bfloat16
    assert weights_checksum(flipped) != weights_checksum(tensors)
    renamed = [("other" if n == "f32" else n, t) for n, t in tensors]
    assert weights_checksum(renamed) != weights_checksum(tensors)


# ---- version assembly -----------------------------------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.loads: list[tuple[int, list[str]]] = []

    def load_weights(self, named_tensors, *, version: int) -> None:
        self.loads.append((version, [n for n, _ in named_tensors]))


def _bucket(version: int, index: int, is_last: bool) -> dict:
    return dict(version=version, index=index, is_last=is_last, tensors=[(f"v{version}b{index}", torch.zeros(1))])


def test_receiver_applies_a_version_once_all_buckets_arrived_in_any_order():
    rec = Recorder()
    receiver = WeightReceiver(rec.load_weights)
    assert receiver.add_bucket(**_bucket(1, 2, True)) is None
    assert receiver.add_bucket(**_bucket(1, 0, False)) is None
    assert rec.loads == [] and receiver.version is None
    assert receiver.add_bucket(**_bucket(1, 1, False)) == 1
    assert rec.loads == [(1, ["v1b0", "v1b1", "v1b2"])]  # one load, buckets in index order


def test_newer_version_abandons_an_incomplete_one_and_old_buckets_are_ignored():
    rec = Recorder()
    receiver = WeightReceiver(rec.load_weights)
    receiver.add_bucket(**_bucket(1, 0, False))
    receiver.add_bucket(**_bucket(2, 0, False))  # version 1 never completes
    assert receiver.add_bucket(**_bucket(1, 1, True)) is None  # late bucket of the abandoned version
    assert receiver.add_bucket(**_bucket(2, 1, True)) == 2
    assert receiver.add_bucket(**_bucket(2, 0, True)) == 2  # a repeat of a held version changes nothing
    assert rec.loads == [(2, ["v2b0", "v2b1"])]


def test_a_version_sent_again_is_assembled_anew():
    """The sender sends a version again after a worker died in the middle of a broadcast: the buckets
    that arrived of the first sending must not make the second one fail or mix into it."""
    rec = Recorder()
    receiver = WeightReceiver(rec.load_weights)
    receiver.add_bucket(**_bucket(1, 0, False))
    receiver.add_bucket(**_bucket(1, 1, False))  # the first sending stops here
    assert receiver.add_bucket(version=1, index=0, is_last=False, tensors=[("again", torch.zeros(1))]) is None
    assert receiver.add_bucket(**_bucket(1, 1, True)) == 1  # two buckets: the old bucket 1 was dropped too
    assert rec.loads == [(1, ["again", "v1b1"])]


def test_receiver_rejects_out_of_range_buckets():
    receiver = WeightReceiver(Recorder().load_weights)
    receiver.add_bucket(**_bucket(1, 0, False))
    receiver.add_bucket(**_bucket(1, 5, False))
    with pytest.raises(ValueError, match="0..2"):
        receiver.add_bucket(**_bucket(1, 2, True))  # three buckets, but indices 0, 2, 5


def test_receive_of_an_object_store_message():
    rec = Recorder()
    receiver = WeightReceiver(rec.load_weights)
    tensors = sample_tensors()
    assert receiver.receive(bucket_to_message(WeightBucket(4, 0, True, tensors))) == 4
    assert rec.loads == [(4, [n for n, _ in tensors])]


def test_config_bounds():
    with pytest.raises(ValueError, match="transport"):
        WeightSyncConfig(transport="nfs")
    with pytest.raises(ValueError, match="bucket_bytes"):
        WeightSyncConfig(bucket_bytes=0)


# ---- broadcast group, threads (no Ray) ------------------------------------------------------------------
def test_gloo_group_delivers_identical_tensors_and_an_abort():
    world = 3
    store = open_store(host="127.0.0.1", world_size=world, timeout_s=WAIT_S)
    address = f"127.0.0.1:{store.port}"
    received: dict[int, list] = {}
    errors: list[BaseException] = []

    def receive(rank: int) -> None:
        try:
            group = BroadcastGroup(store=connect_store(address, world_size=world, timeout_s=WAIT_S), rank=rank,
                                   world_size=world, backend="gloo", timeout_s=WAIT_S)
            received[rank] = [group.recv_bucket(), group.recv_bucket()]
            with pytest.raises(WeightSyncAborted, match="export failed"):
                group.recv_bucket()
        except BaseException as error:  # surfaced by the main thread's assertion
            errors.append(error)

    threads = [threading.Thread(target=receive, args=(rank,), daemon=True) for rank in (1, 2)]
    for t in threads:
        t.start()
    sender = BroadcastGroup(store=store, rank=0, world_size=world, backend="gloo", timeout_s=WAIT_S)
    tensors = sample_tensors()
    sender.send_bucket(WeightBucket(version=7, index=0, is_last=False, tensors=tensors), pack_below_bytes=32)
    sender.send_bucket(WeightBucket(version=7, index=1, is_last=True, tensors=tensors[::-1]))  # none packed
    sender.send_abort("export failed")
    for t in threads:
        t.join(WAIT_S)
    assert not errors and sorted(received) == [1, 2]
    for (manifest, named), (manifest_1, named_1) in received.values():
        assert (manifest.version, manifest.index, manifest.is_last) == (7, 0, False)
        assert manifest.packed == [False, True, True, False, True, True, True]
        assert_identical(named, tensors)
        assert (manifest_1.index, manifest_1.is_last, any(manifest_1.packed)) == (1, True, False)
        assert_identical(named_1, tensors[::-1])


def test_a_version_aborted_over_the_broadcast_can_be_sent_again():
    store = open_store(host="127.0.0.1", world_size=2, timeout_s=WAIT_S)
    rec = Recorder()
    receiver = WeightReceiver(rec.load_weights)
    outcomes: list = []

    def receive() -> None:
        receiver.join_group(address=f"127.0.0.1:{store.port}", rank=1, world_size=2, backend="gloo", timeout_s=WAIT_S)
        for _ in range(2):
            try:
                outcomes.append(receiver.receive_broadcast())
            except BaseException as error:  # surfaced by the main thread's assertion
                outcomes.append(error)

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    sender = BroadcastGroup(store=store, rank=0, world_size=2, backend="gloo", timeout_s=WAIT_S)
    first = WeightBucket(version=1, index=0, is_last=False, tensors=[("w", torch.ones(2))])
    sender.send_bucket(first)
    sender.send_abort("export failed")
    sender.send_bucket(first)
    sender.send_bucket(WeightBucket(version=1, index=1, is_last=True, tensors=[("b", torch.ones(1))]))
    thread.join(WAIT_S)
    assert isinstance(outcomes[0], WeightSyncAborted) and outcomes[1:] == [1]
    assert rec.loads == [(1, ["w", "b"])]


# ---- both transports under Ray ----------------------------------------------------------------------------
class TinyPolicy(torch.nn.Module):
    """Float32 and bfloat16 parameters, a tied weight and a persistent buffer: what export must carry."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(64, 16)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
        self.norm = torch.nn.Linear(16, 16).to(torch.bfloat16)
        self.head = torch.nn.Linear(16, 64, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.tensor([0.5, 2.0]))


class PolicyHolder(WeightReceiverMixin):
    """A rollout-worker stand-in holding a real torch model; the mixin under test is the real one."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = TinyPolicy()
        self.loaded_versions: list[int] = []
        self.writable_arrays = 0  # object-store arrays that were copies rather than shared-memory views

    def receive_weight_bucket(self, message):
        self.writable_arrays += sum(c.flags.writeable for c in message.chunks)
        return super().receive_weight_bucket(message)

    def load_weights(self, named_tensors, *, version: int) -> None:
        self.model.load_state_dict(dict(named_tensors), strict=True)
        self.loaded_versions.append(version)

    def checksum(self) -> str:
        return weights_checksum(self.model.state_dict().items())

    def versions(self) -> tuple[list[int], int | None]:
        return self.loaded_versions, self.synced_weights_version()

    def copied_arrays(self) -> int:
        return self.writable_arrays


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("transport", ["object_store", "broadcast"])
def test_both_receivers_get_byte_identical_weights_and_the_version(ray_session, transport):
    ray = ray_session
    holders = [ray.remote(num_cpus=0)(PolicyHolder).remote(seed) for seed in (1, 2)]
    policy = TinyPolicy()
    # several buckets; biases and the buffer packed, weight matrices alone
    sender = WeightSender(WeightSyncConfig(transport=transport, bucket_bytes=4096, pack_below_bytes=256))
    sender.connect(holders)
    for version in (1, 2):
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn_like(p))  # a learner step
        expected = weights_checksum(policy.state_dict().items())
        assert set(ray.get([h.checksum.remote() for h in holders])) != {expected}
        report = sender.sync(export_weights(policy, version=version, bucket_bytes=4096))
        assert report.version == version and report.buckets > 1 and report.receivers == 2
        assert ray.get([h.checksum.remote() for h in holders]) == [expected, expected]
    assert ray.get([h.versions.remote() for h in holders]) == [([1, 2], 2), ([1, 2], 2)]

    def cut_stream():
        buckets = list(export_weights(policy, version=3, bucket_bytes=4096))
        yield from buckets[:-1]
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        sender.sync(cut_stream())
    # the receivers kept version 2; the same version sent again arrives whole (its first buckets do not make
    # it "arrive twice"), and the transport works on for the next version
    assert ray.get([h.versions.remote() for h in holders]) == [([1, 2], 2), ([1, 2], 2)]
    assert sender.sync(export_weights(policy, version=3, bucket_bytes=4096)).version == 3
    with torch.no_grad():
        policy.mlp[0].weight.mul_(-1.0)
    sender.sync(export_weights(policy, version=4, bucket_bytes=4096))
    expected = weights_checksum(policy.state_dict().items())
    assert ray.get([h.checksum.remote() for h in holders]) == [expected, expected]
    assert ray.get([h.versions.remote() for h in holders]) == [([1, 2, 3, 4], 4), ([1, 2, 3, 4], 4)]
    assert ray.get([h.copied_arrays.remote() for h in holders]) == [0, 0]  # zero-copy gets (read-only views)
    for h in holders:
        ray.kill(h)


def test_a_bucket_that_cannot_be_packed_is_told_to_the_broadcast_receivers(ray_session, monkeypatch):
    """Packing a bucket for the broadcast can fail (out of GPU memory). Counted as inside the broadcast, it sent
    no abort, and the receivers waited for the bucket until timeout_s, holding up the next sync."""
    import actors.weights as weights_module

    ray = ray_session
    holder = ray.remote(num_cpus=0)(PolicyHolder).remote(0)
    policy = TinyPolicy()
    sender = WeightSender(WeightSyncConfig(transport="broadcast", bucket_bytes=4096, timeout_s=30.0))
    sender.connect([holder])
    real_pack = weights_module.pack_bucket

    def pack_but_the_second(bucket, **kwargs):
        if bucket.index == 1:
            raise MemoryError("no room to pack")
        return real_pack(bucket, **kwargs)

    monkeypatch.setattr(weights_module, "pack_bucket", pack_but_the_second)
    with pytest.raises(MemoryError):
        sender.sync(export_weights(policy, version=1, bucket_bytes=4096))
    monkeypatch.undo()
    start = time.monotonic()
    assert sender.sync(export_weights(policy, version=2, bucket_bytes=4096)).version == 2
    assert time.monotonic() - start < 20  # not held up by a receiver waiting out the timeout
    assert ray.get(holder.versions.remote()) == ([2], 2)
    ray.kill(holder)


def test_sender_refuses_an_out_of_order_stream(ray_session):
    ray = ray_session
    holder = ray.remote(num_cpus=0)(PolicyHolder).remote(0)
    sender = WeightSender(WeightSyncConfig())
    sender.connect([holder])
    buckets = list(export_weights(TinyPolicy(), version=1, bucket_bytes=4096))
    with pytest.raises(ValueError, match="out of order"):
        sender.sync([buckets[1], buckets[0]])
    with pytest.raises(ValueError, match="without a last bucket"):
        sender.sync(buckets[:-1])
    assert ray.get(holder.versions.remote()) == ([], None)
    ray.kill(holder)
