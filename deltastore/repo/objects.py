"""The object store: immutable, content-addressed, compressed blobs on disk.

Layout (under the store folder)::

    objects/
      3f/
        9a0c...e1        one object: header + payload, named by the BLAKE3 of the payload
    tmp/
      <pid>-<random>.tmp files being written; never read, removed by fsck --repair / gc

An object file is a 16-byte header (magic `DSOB`, format version, compression, the
uncompressed size as u64 little-endian) followed by the payload, zstd-compressed or raw.
Writes go to tmp/, are fsynced, then renamed into place, so a reader sees a whole object
or none. Every read checks the declared size before allocating, bounds decompression by it,
and checks the hash: a flipped bit is a `CorruptObject`, never wrong weights.

This module knows nothing of the catalog; the store decides which objects are referenced.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import zstandard

from ..core.durable import fsync_dir
from ..core.errors import CorruptObject, DiskFull, MissingObject, UnsafeInput, is_disk_full
from ..core.hashing import ALGORITHM, bytes_id, hasher, hexdigest_id, is_id
from ..core.pools import cores, pool

MAGIC = b"DSOB"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sBBHQ")  # magic, version, compression, reserved, raw size
RAW, ZSTD = 0, 1
ZSTD_LEVEL = 3
# zstd's worker threads only pay off on payloads of several MB.
THREADED_FROM = 4 << 20
# A payload of at least this many bytes is written as FRAMES zstd frames of about equal size,
# each declaring its content size, which readers decompress on two threads at once: zstd
# decodes a frame on one core only, and a surgical apply waits mostly on that.
FRAMED_FROM = 1 << 20
FRAMES = 4
# No single tensor delta comes near this; anything larger is a hostile header.
MAX_OBJECT_BYTES = 1 << 40
# zstd's densest block (RLE: a 3-byte header and one byte) regenerates at most 128 KiB, so a
# body of n bytes can never hold more than n * 2**15 bytes.
MAX_ZSTD_RATIO = 1 << 15
# The first buffer of a decompression; it grows while frames keep producing data. Deltas
# compress a few times at most, so one buffer is nearly always enough.
FIRST_BUFFER = 16 << 20
# A part of at least this many bytes is read by a file patch a block at a time (`sections`),
# never whole: an embedding's delta of several hundred MB would otherwise be held once per
# worker, and peak memory would grow with the model's largest tensor.
STREAM_FROM = 32 << 20
# How much of an object file a section's zstd reader asks the kernel for at a time.
SECTION_READ = 1 << 20


@dataclass(frozen=True)
class PutResult:
    id: str
    size: int  # bytes on disk, header included
    raw_size: int
    new: bool  # False when equal content was already stored


class ObjectStore:
    def __init__(self, root: Path, *, threads: int | None = None):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.threads = threads if threads is not None else default_threads()
        self._unsynced_dirs: set[Path] = set()

    def path(self, object_id: str) -> Path:
        return Path(self._file(object_id))

    def _file(self, object_id: str) -> str:
        # A plain string: pathlib's joins cost more than reading a small object.
        if not is_id(object_id):
            raise UnsafeInput(f"{object_id!r} is not an object id")
        return os.path.join(self.objects, object_id[3:5], object_id[5:])

    def exists(self, object_id: str) -> bool:
        return self.path(object_id).is_file()

    def size(self, object_id: str) -> int:
        return self.path(object_id).stat().st_size

    def put(self, data: bytes | memoryview, *, object_id: str | None = None, sync_dir: bool = True) -> PutResult:
        """Store a payload (once: equal content is never written twice). `object_id`, when the
        caller already hashed the payload, saves hashing it again. With `sync_dir=False` the
        rename is made durable by a later `sync()`, which must run before any catalog row
        refers to the object; the object's content is fsynced before its rename either way,
        so a crash can lose an object but never leave a partial one."""
        object_id = object_id or bytes_id(data)
        path = self.path(object_id)
        if path.is_file():
            # Refresh its time: gc spares recently written or re-used objects.
            os.utime(path)
            return PutResult(object_id, path.stat().st_size, len(data), False)
        payload, compression = self._compress(data)
        header = HEADER.pack(MAGIC, FORMAT_VERSION, compression, 0, len(data))
        self._write_atomic(path, header, payload, sync_dir=sync_dir)
        return PutResult(object_id, HEADER.size + len(payload), len(data), True)

    def put_stream(self, chunks: Callable[[], Iterable[memoryview]], size: int, *,
                   claim: Callable[[str], None], sync_dir: bool = True) -> PutResult:
        """`put` of a payload given as chunks (`chunks()` yields them, again if called again),
        hashed and compressed in one pass while each chunk is hot in the cache, the compressed
        bytes written to a temporary file as they come: neither the payload nor its compressed
        form is ever held whole. `claim(id)` runs once the id is known, before the store looks
        whether the object exists (the caller's gc shield, FORMAT.md rule 2)."""
        h = hasher(0)  # fed a chunk at a time: one thread hashes it faster than several
        # One zstd thread compresses while this one produces and hashes the next chunks; the
        # caller's own workers are the rest of the parallelism (more threads measured slower).
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=min(self.threads, 1))
        self.tmp.mkdir(exist_ok=True)
        tmp = self.tmp / f"{os.getpid()}-{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(HEADER.pack(MAGIC, FORMAT_VERSION, ZSTD, 0, size))
                written = HEADER.size + _compress_stream(compressor, chunks(), size, h, f.write)
                object_id = hexdigest_id(h)
                claim(object_id)
                path = self.path(object_id)
                if path.is_file():
                    os.utime(path)
                    return PutResult(object_id, path.stat().st_size, size, False)
                if size < 64 or written - HEADER.size >= size:
                    # As `compress` decides: an incompressible payload is kept raw.
                    f.seek(0)
                    f.truncate()
                    f.write(HEADER.pack(MAGIC, FORMAT_VERSION, RAW, 0, size))
                    for chunk in chunks():
                        f.write(chunk)
                    written = HEADER.size + size
                f.flush()
                os.fsync(f.fileno())
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
        except BaseException as e:
            if is_disk_full(e):
                raise DiskFull() from None
            raise
        finally:
            tmp.unlink(missing_ok=True)
        if sync_dir:
            fsync_dir(path.parent)
        else:
            self._unsynced_dirs.add(path.parent)
        return PutResult(object_id, written, size, True)

    def _compress(self, data: bytes | memoryview) -> tuple[bytes | memoryview, int]:
        return compress(data, threads=self.threads)

    def _write_atomic(self, path: Path, header: bytes, payload: bytes | memoryview, *, sync_dir: bool) -> None:
        self.tmp.mkdir(exist_ok=True)
        tmp = self.tmp / f"{os.getpid()}-{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if is_disk_full(e):
                raise DiskFull() from None
            raise
        if sync_dir:
            fsync_dir(path.parent)
        else:
            self._unsynced_dirs.add(path.parent)

    def sync(self) -> None:
        """Make every rename done with `sync_dir=False` durable."""
        while self._unsynced_dirs:
            fsync_dir(self._unsynced_dirs.pop())

    def get(self, object_id: str, *, raw_size: int | None = None, parallel: bool = True,
            into: Any = None) -> bytes | bytearray | memoryview:
        """The payload of an object, verified against its id (and its expected size).
        `parallel` and `into`: see decode_file."""
        try:
            with open(self._file(object_id), "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            raise MissingObject(object_id) from None
        payload = self.decode_file(object_id, blob, raw_size=raw_size, parallel=parallel, into=into)
        if bytes_id(payload) != object_id:
            raise CorruptObject(object_id, "content does not match its id")
        return payload

    @staticmethod
    def decode_file(object_id: str, blob: bytes, *, raw_size: int | None = None,
                    parallel: bool = True, into: Any = None) -> bytes | bytearray | memoryview:
        """The payload an object file holds, its header checked. A payload of several zstd frames
        is decompressed two frames at a time unless `parallel` is False: a caller with a few MB
        to decode on a busy machine waits longer for a pool thread to wake than for the work.

        `into`: a writable buffer of exactly `raw_size` bytes to put the payload in (returned as
        a view of it). Memory written before costs half of what fresh memory does: the kernel
        maps and zeroes each fresh page on its first write (decompressing a 272 MB payload:
        311 ms CPU into fresh memory, 161 ms into a buffer used before)."""
        if len(blob) < HEADER.size:
            raise CorruptObject(object_id, "shorter than its header")
        magic, version, compression, _, declared = HEADER.unpack_from(blob)
        if magic != MAGIC or version != FORMAT_VERSION:
            raise CorruptObject(object_id, "not a deltastore object")
        if raw_size is not None and declared != raw_size:
            raise CorruptObject(object_id, f"declares {declared} bytes, expected {raw_size}")
        if declared > MAX_OBJECT_BYTES:
            raise CorruptObject(object_id, f"declares an impossible size ({declared} bytes)")
        body = memoryview(blob)[HEADER.size:]
        target = None
        if into is not None:
            target = memoryview(into).cast("B")
            if raw_size is None or len(target) != raw_size or target.readonly:
                raise ValueError("`into` must be a writable buffer of raw_size bytes")
        if compression == RAW:
            if len(body) != declared:
                raise CorruptObject(object_id, "payload size differs from its header")
            if target is None:
                return bytes(body)
            target[:] = body
            return target
        if compression != ZSTD:
            raise CorruptObject(object_id, f"unknown compression {compression}")
        return _bounded_decompress(object_id, body, declared, parallel=parallel, into=target)

    def sections(self, object_id: str, raw_size: int, count: int) -> list["Section"] | None:
        """The payload as `count` equal sections, each read in order a buffer at a time by its
        own `Section` (the byte planes of a lossless payload, read side by side), or None where
        the object's frames do not allow starting mid-way (the caller reads it whole instead).
        The sections' bytes are not checked against the id, which needs all of them in order:
        the caller checks what it builds from them (a result against its recorded id)."""
        if raw_size % count:
            return None
        with open(self._opened(object_id), "rb") as f:
            starts = _section_starts(object_id, f, raw_size, [k * raw_size // count for k in range(count)])
        if starts is None:
            return None
        return [Section(self._file(object_id), object_id, *start) for start in starts]

    def _opened(self, object_id: str) -> str:
        path = self._file(object_id)
        if not os.path.isfile(path):
            raise MissingObject(object_id)
        return path

    def ids(self) -> Iterator[str]:
        """Every object on disk, whether or not the catalog references it."""
        if not self.objects.is_dir():
            return
        for fan in sorted(self.objects.iterdir()):
            if len(fan.name) != 2 or not fan.is_dir():
                continue
            for f in sorted(fan.iterdir()):
                object_id = f"{ALGORITHM}:{fan.name}{f.name}"
                if is_id(object_id):
                    yield object_id

    def remove(self, object_id: str) -> int:
        path = self.path(object_id)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size


def default_threads() -> int:
    return min(os.cpu_count() or 1, 8)


def compress(data: bytes | memoryview, *, threads: int | None = None) -> tuple[bytes | memoryview, int]:
    """(payload, compression) as an object file holds them: zstd, or raw where that is not smaller.
    `HEADER.size + len(payload)` is the object's size on disk."""
    if len(data) < 64:
        return data, RAW
    threads = default_threads() if threads is None else threads
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=threads if len(data) >= THREADED_FROM else 0)
    view, start = memoryview(data).cast("B"), 0
    frames = []
    for end in frame_ends(len(data)):
        frames.append(compressor.compress(view[start:end]))
        start = end
    packed = frames[0] if len(frames) == 1 else b"".join(frames)
    # Incompressible payloads are kept raw: decoding them then costs nothing.
    return (packed, ZSTD) if len(packed) < len(data) else (data, RAW)


def _compress_stream(compressor: Any, chunks: Iterable[memoryview], size: int, h: Any,
                     write: Callable[[bytes], Any]) -> int:
    """`chunks` (exactly `size` bytes) hashed into `h` and compressed as `compress` frames
    them, each piece of output handed to `write`; the compressed bytes' count."""
    ends = iter(frame_ends(size))
    seen, end, out = 0, next(ends, size), 0
    stream = compressor.compressobj(size=end)

    def put(data: bytes) -> None:
        nonlocal out
        if data:
            write(data)
            out += len(data)

    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        if seen + len(view) > size:
            seen += len(view)
            break
        h.update(view)
        while view:
            # A chunk may straddle the end of a frame: finish it, and start the next.
            take = min(len(view), end - seen)
            put(stream.compress(view[:take]))
            seen, view = seen + take, view[take:]
            if seen == end and seen < size:
                put(stream.flush())
                start, end = end, next(ends)
                stream = compressor.compressobj(size=end - start)
    if seen != size:
        raise ValueError(f"a payload stream of {size} bytes gave {'more' if seen > size else seen}")
    put(stream.flush())
    return out


def frame_ends(size: int) -> list[int]:
    """Where each zstd frame of a payload of `size` bytes ends: one frame below FRAMED_FROM,
    else FRAMES of about equal size."""
    if size < FRAMED_FROM:
        return [size]
    return [size * (k + 1) // FRAMES for k in range(FRAMES)]


def stored_size(data: bytes | memoryview, *, threads: int | None = None) -> int:
    """The bytes an object holding `data` takes on disk, header included, without writing it."""
    return HEADER.size + len(compress(data, threads=threads)[0])


ZSTD_MAGIC, SKIPPABLE_MAGIC = 0xFD2FB528, 0x184D2A50


def zstd_frames(body: memoryview) -> list[tuple[int, int, int]] | None:
    """(start, end, content size) of each zstd frame of a body, found from the frame and
    block headers without decompressing; None where any frame does not declare its content
    size or anything does not parse (the sequential reader then decides what is wrong)."""
    frames, pos, n = [], 0, len(body)
    while pos < n:
        if n - pos < 8:
            return None
        magic = int.from_bytes(body[pos:pos + 4], "little")
        if magic & 0xFFFFFFF0 == SKIPPABLE_MAGIC:
            pos += 8 + int.from_bytes(body[pos + 4:pos + 8], "little")
            continue
        if magic != ZSTD_MAGIC:
            return None
        try:
            header = zstandard.frame_header_size(body[pos:pos + 18])
            params = zstandard.get_frame_parameters(body[pos:pos + header])
        except zstandard.ZstdError:
            return None
        if params.content_size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
            return None
        end, last = pos + header, False
        while not last:
            if end + 3 > n:
                return None
            block = int.from_bytes(body[end:end + 3], "little")
            last, kind, size = bool(block & 1), (block >> 1) & 3, block >> 3
            if kind == 3:
                return None
            end += 3 + (1 if kind == 1 else size)  # an RLE block holds its one byte
        end += 4 if params.has_checksum else 0
        if end > n:
            return None
        frames.append((pos, end, params.content_size))
        pos = end
    return frames


def _parallel_decompress(body: memoryview, declared: int, into: memoryview | None = None
                         ) -> bytearray | memoryview | None:
    """Every frame decompressed into its place in one buffer (`into` where given), a frame
    per core at a time (pools.cores); None unless the frames declare exactly `declared` bytes between them (then the
    sequential reader runs, and says what is wrong)."""
    frames = zstd_frames(body)
    if frames is None or len(frames) < 2 or sum(size for _, _, size in frames) != declared:
        return None
    if into is None and declared > max(FIRST_BUFFER, 64 * len(body)):
        # Allocated whole before anything is decoded: no more than the sequential reader's
        # first buffer, which grows only as frames really produce data.
        return None
    out = bytearray(declared) if into is None else into
    view = memoryview(out)
    places, at = [], 0
    for start, end, size in frames:
        places.append((body[start:end], view[at:at + size]))
        at += size

    def one(frame: memoryview, into: memoryview) -> bool:
        filled = 0
        with zstandard.ZstdDecompressor().stream_reader(frame) as reader:
            while filled < len(into):
                got = reader.readinto(into[filled:])
                if not got:
                    return False
                filled += got
            return not reader.read(1)

    # A frame per core at a time: two here; on a many-core machine, an embedding's frames
    # would otherwise leave all but two cores idle while every other tensor waits for it.
    if not all(pool("zstd", cores()).map(lambda place: one(*place), places)):
        return None
    del places, view
    return out


def _bounded_decompress(object_id: str, body: memoryview, declared: int, *, parallel: bool = True,
                        into: memoryview | None = None) -> bytearray | memoryview:
    # Read at most one byte past the declared size: a frame that expands further is refused
    # without ever holding more than declared + 1 bytes. The buffer grows as data arrives, so
    # a header that declares more than its frames hold costs no more than what they hold.
    # (`into`, of the declared size, is the caller's: it does not grow.)
    if declared > len(body) * MAX_ZSTD_RATIO:
        raise CorruptObject(object_id, f"declares an impossible size ({declared} bytes from "
                                       f"{len(body)} bytes of zstd)")
    if parallel and declared >= FRAMED_FROM:
        try:
            out = _parallel_decompress(body, declared, into)
        except zstandard.ZstdError:
            out = None  # the sequential reader below names the problem
        if out is not None:
            return out
    if into is not None:
        return _decompress_into(object_id, body, into)
    limit = declared + 1
    out = bytearray(min(limit, max(FIRST_BUFFER, 64 * len(body))))
    filled = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True) as reader:
            while filled < limit:
                if filled == len(out):
                    # A fresh (lazily zeroed) buffer four times larger: the old one and the new
                    # are all this holds, and a large payload is copied at most a few times.
                    grown = bytearray(min(limit, 4 * len(out)))
                    grown[:filled] = memoryview(out)[:filled]
                    out = grown
                # A temporary view: the bytearray cannot shrink at the end while one is alive.
                got = reader.readinto(memoryview(out)[filled:])
                if not got:
                    break
                filled += got
    except zstandard.ZstdError as e:
        raise CorruptObject(object_id, f"zstd: {e}") from None
    if filled != declared:
        raise CorruptObject(object_id, f"decompresses to {'more' if filled > declared else filled} "
                                       f"bytes, header declares {declared}")
    del out[declared:]
    return out


def _decompress_into(object_id: str, body: memoryview, into: memoryview) -> memoryview:
    """_bounded_decompress into a buffer of the declared size: one byte more is refused."""
    filled, extra = 0, bytearray(1)
    try:
        with zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True) as reader:
            while filled < len(into):
                got = reader.readinto(into[filled:])
                if not got:
                    break
                filled += got
            more = filled == len(into) and reader.readinto(extra)
    except zstandard.ZstdError as e:
        raise CorruptObject(object_id, f"zstd: {e}") from None
    if filled != len(into) or more:
        raise CorruptObject(object_id, f"decompresses to {'more' if more else filled} "
                                       f"bytes, header declares {len(into)}")
    return into


class _FileBytes:
    """An object file's body as `zstd_frames` slices it, each slice one pread: the frame scan
    reads a few bytes per zstd block, never the body (nor maps it, which would count its
    pages against the process's memory)."""

    def __init__(self, fd: int, start: int, size: int):
        self.fd, self.start, self.size = fd, start, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, s: slice) -> bytes:
        first, end = max(s.start or 0, 0), min(self.size if s.stop is None else s.stop, self.size)
        return os.pread(self.fd, max(end - first, 0), self.start + first)


def _section_starts(object_id: str, f: Any, raw_size: int, offsets: list[int]
                    ) -> list[tuple[int, int, int]] | None:
    """For each payload offset: (file position to read from, compression, bytes to skip there
    first); None where a zstd body's frames do not declare their sizes and an offset is not 0.
    The header is checked as `decode_file` checks it."""
    blob = f.read(HEADER.size)
    if len(blob) < HEADER.size:
        raise CorruptObject(object_id, "shorter than its header")
    magic, version, compression, _, declared = HEADER.unpack(blob)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise CorruptObject(object_id, "not a deltastore object")
    if declared != raw_size:
        raise CorruptObject(object_id, f"declares {declared} bytes, expected {raw_size}")
    body = os.fstat(f.fileno()).st_size - HEADER.size
    if compression == RAW:
        if body != declared:
            raise CorruptObject(object_id, "payload size differs from its header")
        return [(HEADER.size + at, RAW, 0) for at in offsets]
    if compression != ZSTD:
        raise CorruptObject(object_id, f"unknown compression {compression}")
    if declared > body * MAX_ZSTD_RATIO:
        raise CorruptObject(object_id, f"declares an impossible size ({declared} bytes from {body} bytes of zstd)")
    if not any(offsets):
        return [(HEADER.size, ZSTD, 0) for _ in offsets]
    frames = zstd_frames(_FileBytes(f.fileno(), HEADER.size, body))  # type: ignore[arg-type]
    if frames is None or sum(size for _, _, size in frames) != declared:
        return None
    starts, content = [], [0]
    for _, _, size in frames:
        content.append(content[-1] + size)
    for at in offsets:
        k = max(i for i in range(len(frames)) if content[i] <= at) if at < declared else len(frames) - 1
        starts.append((HEADER.size + frames[k][0], ZSTD, at - content[k]))
    return starts


class Section:
    """Bytes of an object's payload read in order from one place, a buffer at a time. A stream
    that ends early or does not decode is a `CorruptObject`; bytes are decoded only as far as
    they are asked for, so a payload that would expand further costs nothing."""

    def __init__(self, path: str, object_id: str, position: int, compression: int, skip: int):
        self.object_id = object_id
        self.file = open(path, "rb")
        self.file.seek(position)
        self.stream: Any = self.file
        if compression == ZSTD:
            self.stream = zstandard.ZstdDecompressor().stream_reader(
                self.file, read_size=SECTION_READ, read_across_frames=True, closefd=False)
        while skip:  # where a section starts inside a frame (not for 1-, 2- and 4-byte planes)
            skip -= self.readinto(memoryview(bytearray(min(skip, SECTION_READ))))

    def readinto(self, buffer: Any) -> int:
        """Fill `buffer` whole with the next bytes; returns its length."""
        view, filled = memoryview(buffer).cast("B"), 0
        try:
            while filled < len(view):
                got = self.stream.readinto(view[filled:])
                if not got:
                    raise CorruptObject(self.object_id, "its payload ends before its declared size")
                filled += got
        except zstandard.ZstdError as e:
            raise CorruptObject(self.object_id, f"zstd: {e}") from None
        return filled

    def close(self) -> None:
        if self.stream is not self.file:
            self.stream.close()
        self.file.close()
