"""The object store: round trips, dedup, and every way an object file can be damaged."""

from __future__ import annotations

import os
import random

import pytest
import zstandard

from deltastore.core.errors import CorruptObject, MissingObject, UnsafeInput
from deltastore.core.hashing import bytes_id
from deltastore.repo.objects import HEADER, MAGIC, RAW, ZSTD, ObjectStore

from helpers import flip_byte, temporary_files

PAYLOADS = {
    "empty": b"",
    "tiny": b"abc",
    "compressible": b"deltastore " * 5000,
    "random": random.Random(0).randbytes(10_000),
}


def header_of(path) -> tuple:
    return HEADER.unpack_from(path.read_bytes())


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_put_get_round_trip(tmp_path, kind) -> None:
    objects = ObjectStore(tmp_path)
    data = PAYLOADS[kind]
    put = objects.put(data)
    assert put.id == bytes_id(data)
    assert put.new and put.raw_size == len(data)
    path = objects.path(put.id)
    assert path.parent.parent == tmp_path / "objects"
    assert path.parent.name + path.name == put.id.removeprefix("b3:")  # fan-out by two hex digits
    assert put.size == path.stat().st_size
    assert objects.get(put.id) == data
    assert objects.get(put.id, raw_size=len(data)) == data
    assert list(objects.ids()) == [put.id]
    assert temporary_files(objects) == []


def test_compressible_payloads_are_zstd_and_incompressible_ones_raw(tmp_path) -> None:
    objects = ObjectStore(tmp_path)
    packed = objects.put(PAYLOADS["compressible"])
    magic, version, compression, _, declared = header_of(objects.path(packed.id))
    assert (magic, compression, declared) == (MAGIC, ZSTD, len(PAYLOADS["compressible"]))
    assert packed.size < len(PAYLOADS["compressible"]) // 10
    plain = objects.put(PAYLOADS["random"])
    assert header_of(objects.path(plain.id))[2] == RAW
    assert plain.size == HEADER.size + len(PAYLOADS["random"])


def test_second_put_of_equal_content_writes_nothing(tmp_path) -> None:
    objects = ObjectStore(tmp_path)
    first = objects.put(PAYLOADS["compressible"])
    path = objects.path(first.id)
    before = (path.stat().st_ino, path.read_bytes())
    second = objects.put(bytearray(PAYLOADS["compressible"]))
    assert second.id == first.id and not second.new and second.size == first.size
    assert (path.stat().st_ino, path.read_bytes()) == before
    assert list(objects.ids()) == [first.id]
    assert temporary_files(objects) == []


def test_a_flipped_byte_is_a_corrupt_object(tmp_path) -> None:
    objects = ObjectStore(tmp_path)
    for kind in ("compressible", "random"):
        put = objects.put(PAYLOADS[kind])
        flip_byte(objects.path(put.id), (HEADER.size + put.size) // 2)  # inside the payload
        with pytest.raises(CorruptObject) as e:
            objects.get(put.id)
        assert e.value.object_id == put.id
        assert put.id in str(e.value) and "fsck" in str(e.value)
        assert isinstance(e.value, ValueError)


def test_a_damaged_header_is_a_corrupt_object(tmp_path) -> None:
    objects = ObjectStore(tmp_path)
    put = objects.put(PAYLOADS["compressible"])
    flip_byte(objects.path(put.id), 0)  # the magic
    with pytest.raises(CorruptObject, match="not a deltastore object"):
        objects.get(put.id)


def test_a_truncated_object_is_a_corrupt_object(tmp_path) -> None:
    objects = ObjectStore(tmp_path)
    for kind in ("compressible", "random"):
        put = objects.put(PAYLOADS[kind])
        path = objects.path(put.id)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 7])
        with pytest.raises(CorruptObject):
            objects.get(put.id)
        path.write_bytes(data[:5])
        with pytest.raises(CorruptObject, match="shorter than its header"):
            objects.get(put.id)


def test_a_size_other_than_the_entry_declares_is_refused(tmp_path) -> None:
    objects = ObjectStore(tmp_path)
    put = objects.put(PAYLOADS["compressible"])
    with pytest.raises(CorruptObject, match="expected"):
        objects.get(put.id, raw_size=len(PAYLOADS["compressible"]) + 1)


def write_object(objects: ObjectStore, object_id: str, compression: int, declared: int, body: bytes):
    path = objects.path(object_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(HEADER.pack(MAGIC, 1, compression, 0, declared) + body)
    return path


def test_a_zstd_frame_expanding_past_its_declared_size_is_refused(tmp_path) -> None:
    objects = ObjectStore(tmp_path)
    payload = b"\0" * 1_000_000
    declared = 1000
    # Named after its first `declared` bytes, so only the bound on decompression can catch it.
    object_id = bytes_id(payload[:declared])
    write_object(objects, object_id, ZSTD, declared, zstandard.ZstdCompressor().compress(payload))
    with pytest.raises(CorruptObject, match="decompresses to more bytes"):
        objects.get(object_id)
    with pytest.raises(CorruptObject, match="decompresses to more bytes"):
        objects.get(object_id, raw_size=declared, into=bytearray(declared))  # the caller's buffer
    # A frame that does not state its content size is bounded just the same.
    stream = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    body = stream.compress(payload) + stream.flush()
    write_object(objects, object_id, ZSTD, declared, body)
    with pytest.raises(CorruptObject, match="decompresses to more bytes"):
        objects.get(object_id)
    with pytest.raises(CorruptObject, match="decompresses to more bytes"):
        objects.get(object_id, raw_size=declared, into=bytearray(declared))


@pytest.mark.parametrize("kind", ["compressible", "random", "framed"])
def test_a_payload_read_into_a_callers_buffer_is_the_same(tmp_path, kind) -> None:
    from deltastore.repo.objects import FRAMED_FROM

    objects = ObjectStore(tmp_path)
    data = framed_payload(FRAMED_FROM + 777) if kind == "framed" else PAYLOADS[kind]
    put = objects.put(data)
    for parallel in (True, False):
        buffer = bytearray(b"\xff" * len(data))  # written before: nothing of it may survive
        payload = objects.get(put.id, raw_size=len(data), parallel=parallel, into=buffer)
        assert bytes(payload) == data and bytes(buffer) == data
    with pytest.raises(ValueError):
        objects.get(put.id, raw_size=len(data), into=bytearray(len(data) - 1))
    with pytest.raises(CorruptObject, match="expected"):  # the header's size is checked first
        objects.get(put.id, raw_size=len(data) + 1, into=bytearray(len(data) + 1))


def test_a_zstd_frame_shorter_than_declared_or_not_zstd_is_refused(tmp_path) -> None:
    objects = ObjectStore(tmp_path)
    payload = b"x" * 5000
    object_id = bytes_id(payload)
    write_object(objects, object_id, ZSTD, 6000, zstandard.ZstdCompressor().compress(payload))
    with pytest.raises(CorruptObject, match="header declares 6000"):
        objects.get(object_id)
    write_object(objects, object_id, ZSTD, 5000, b"definitely not a zstd frame")
    with pytest.raises(CorruptObject, match="zstd"):
        objects.get(object_id)
    write_object(objects, object_id, 7, 5000, payload)
    with pytest.raises(CorruptObject, match="unknown compression"):
        objects.get(object_id)


def test_an_impossible_declared_size_is_refused_before_allocating(tmp_path) -> None:
    objects = ObjectStore(tmp_path)
    object_id = bytes_id(b"whatever")
    write_object(objects, object_id, ZSTD, 1 << 62, zstandard.ZstdCompressor().compress(b"whatever"))
    with pytest.raises(CorruptObject, match="impossible size"):
        objects.get(object_id)


def test_missing_object_and_bad_ids(tmp_path) -> None:
    objects = ObjectStore(tmp_path)
    absent = bytes_id(b"never stored")
    with pytest.raises(MissingObject) as e:
        objects.get(absent)
    assert isinstance(e.value, FileNotFoundError) and e.value.object_id == absent
    for bad in ("b3:../../etc/passwd", "sha256:" + "0" * 64, "b3:" + "G" * 64, "b3:" + "0" * 63):
        with pytest.raises(UnsafeInput):
            objects.path(bad)


def test_temporary_file_removed_when_a_write_fails(tmp_path) -> None:
    objects = ObjectStore(tmp_path)
    data = b"payload that cannot land" * 10
    object_id = bytes_id(data)
    fan = tmp_path / "objects" / object_id.removeprefix("b3:")[:2]
    fan.parent.mkdir(parents=True)
    fan.write_bytes(b"a file where the fan-out folder should be")
    with pytest.raises(OSError):
        objects.put(data)
    assert temporary_files(objects) == []
    assert os.listdir(tmp_path / "tmp") == []
    assert list(objects.ids()) == []


def test_remove_returns_the_bytes_freed(tmp_path) -> None:
    objects = ObjectStore(tmp_path)
    put = objects.put(PAYLOADS["random"])
    assert objects.remove(put.id) == put.size
    assert not objects.exists(put.id)
    assert objects.remove(put.id) == 0


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_a_streamed_put_stores_what_put_would(tmp_path, kind) -> None:
    data = PAYLOADS[kind]
    chunks = lambda: (memoryview(data)[i:i + 777] for i in range(0, len(data), 777))  # noqa: E731
    claimed = []
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    streamed = ObjectStore(tmp_path / "a").put_stream(chunks, len(data), claim=claimed.append)
    plain = ObjectStore(tmp_path / "b").put(data)
    assert claimed == [plain.id] and (streamed.id, streamed.raw_size, streamed.new) == (plain.id, len(data), True)
    store = ObjectStore(tmp_path / "a")
    assert store.get(streamed.id) == data
    assert header_of(store.path(streamed.id))[2] == header_of(ObjectStore(tmp_path / "b").path(plain.id))[2]
    assert store.put_stream(chunks, len(data), claim=claimed.append).new is False
    with pytest.raises(ValueError):
        store.put_stream(chunks, len(data) + 1, claim=claimed.append)


def framed_payload(size: int) -> bytes:
    # Compressible but not trivially: each frame has real blocks to decode.
    rng = random.Random(1)
    return bytes(rng.choice(b"\0\0\0\1\2\3\x7f") for _ in range(size))


def test_a_large_payload_is_written_as_frames_read_two_at_a_time(tmp_path) -> None:
    from deltastore.repo.objects import FRAMED_FROM, FRAMES, frame_ends, zstd_frames

    objects = ObjectStore(tmp_path)
    data = framed_payload(FRAMED_FROM + 12345)
    put = objects.put(data)
    body = memoryview(objects.path(put.id).read_bytes())[HEADER.size:]
    frames = zstd_frames(body)
    assert [size for _, _, size in frames] == [b - a for a, b in zip([0, *frame_ends(len(data))], frame_ends(len(data)))]
    assert len(frames) == FRAMES and frames[-1][1] == len(body)
    assert objects.get(put.id) == data
    assert objects.get(put.id, parallel=False) == data  # one frame after another, on this thread
    # The streamed writer cuts the same frames, whatever its chunks.
    chunks = lambda: (memoryview(data)[i:i + 100_003] for i in range(0, len(data), 100_003))  # noqa: E731
    streamed = ObjectStore(tmp_path / "s")
    (tmp_path / "s").mkdir()
    other = streamed.put_stream(chunks, len(data), claim=lambda oid: None)
    assert other.id == put.id and streamed.path(put.id).read_bytes() == objects.path(put.id).read_bytes()


def test_damaged_or_lying_frames_are_a_corrupt_object(tmp_path) -> None:
    from deltastore.repo.objects import FRAMED_FROM

    objects = ObjectStore(tmp_path)
    data = framed_payload(FRAMED_FROM + 1000)
    put = objects.put(data)
    path = objects.path(put.id)
    good = path.read_bytes()
    for offset in (HEADER.size + 40, len(good) // 2, -2):
        flip_byte(path, offset)
        for parallel in (True, False):
            with pytest.raises(CorruptObject):
                objects.get(put.id, parallel=parallel)
            with pytest.raises(CorruptObject):
                objects.get(put.id, raw_size=len(data), parallel=parallel, into=bytearray(len(data)))
        path.write_bytes(good)
    half = len(data) // 2
    c = zstandard.ZstdCompressor()
    # Frames that declare more, or fewer, bytes between them than the header.
    for first, second in ((data[:half], data[half:] + b"\0"), (data[:half], data[half:-1])):
        write_object(objects, put.id, ZSTD, len(data), c.compress(first) + c.compress(second))
        with pytest.raises(CorruptObject, match="decompresses to|declares"):
            objects.get(put.id)
    # A frame that does not declare its content size, and skippable frames: read one by one.
    honest = c.compress(data[half:])
    lying = zstandard.ZstdCompressor(write_content_size=False).compress(data[half:])
    write_object(objects, put.id, ZSTD, len(data), c.compress(data[:half]) + lying)
    assert objects.get(put.id) == data
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    write_object(objects, put.id, ZSTD, len(data), skippable + c.compress(data[:half]) + skippable + honest)
    assert objects.get(put.id) == data
