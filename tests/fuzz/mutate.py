"""Mutations of valid files: bytes, JSON values, safetensors headers and object headers.

An input is a dict of file name -> bytes (most targets read one file; a PEFT adapter is two).
`mutate` picks one file and applies one to four mutations that suit its kind, so that most
inputs stay close enough to valid to reach the checks deep inside a reader rather than stop
at its first one.
"""

from __future__ import annotations

import json
import math
import random
import struct
from typing import Any

Files = dict[str, bytes]

INTERESTING_INTS = [0, 1, -1, 2, 7, 8, 63, 64, 65, 127, 128, 255, 256, 1023, 1024, 4096, 65535, 65536,
                    2**31 - 1, 2**31, 2**32, 2**32 + 1, 2**40, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64,
                    2**64 + 1, -(2**31), -(2**63), 10**12, 10**18, 10**30]
INTERESTING_FLOATS = [0.0, -0.0, 0.5, 1e-300, 1e308, -1e308, 1e-45, 3.4e38, float("nan"), float("inf"),
                      float("-inf")]
INTERESTING_STRINGS = ["", "a", "..", "../x", "a/b", "a\\b", "/abs", "x\x00y", "x\ny", "\x7f", "\x1b[2J",
                       "é", "\u202e", "\ud7ff", "\udc80", "b3:" + "0" * 64, "b3:" + "g" * 64, "sha256:" + "0" * 64,
                       "F32", "BF16", "U8", "I8", "BOOL", "F8_E4M3", "lossless", "int8", "int4", "nf4", "fp4",
                       "1bit", "lowrank:1", "lowrank:0", "lowrank:" + "9" * 30, "raw", "xor", "fp16", "bf16",
                       "codes", "scales", "us", "vh", "data", "absmax", "code", "signs", "__metadata__",
                       "deltastore/version/1", "deltastore/hub/1", "1" * 2000, "(a+)+$", "((.*)*)*z", "[", "\\"]
INTERESTING_BYTES = [0, 1, 0x7F, 0x80, 0xFF, ord('"'), ord("\\"), ord("{"), ord("}"), ord("["), ord("]"),
                     ord(","), ord(":"), ord("0"), ord("9"), ord("-"), ord("/"), ord("."), ord("e"), ord(" ")]


def mutate(rng: random.Random, files: Files, seeds: list[Files]) -> Files:
    try:
        return _mutate(rng, files, seeds)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, OverflowError):
        # A structure-aware mutation met a structure an earlier one broke: flip bytes instead.
        name = rng.choice(sorted(files))
        return {**files, name: mutate_bytes(rng, files[name], [])}


def _mutate(rng: random.Random, files: Files, seeds: list[Files]) -> Files:
    out = dict(files)
    name = rng.choice(sorted(out))
    data = out[name]
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4])):
        kind = _kind(name, data)
        if kind == "json" and rng.random() < 0.7:
            data = mutate_json_bytes(rng, data, _donors(seeds, name))
        elif kind == "safetensors" and rng.random() < 0.6:
            data = mutate_safetensors(rng, data, _donors(seeds, name))
        elif kind == "object" and rng.random() < 0.5:
            data = mutate_object(rng, data)
        else:
            data = mutate_bytes(rng, data, _donors(seeds, name))
    out[name] = data
    return out


def _kind(name: str, data: bytes) -> str:
    if name.endswith(".json"):
        return "json"
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(".object"):
        return "object"
    return "bytes"


def _donors(seeds: list[Files], name: str) -> list[bytes]:
    return [s[name] for s in seeds if name in s]


# -- bytes ---------------------------------------------------------------------------------------


def mutate_bytes(rng: random.Random, data: bytes, donors: list[bytes]) -> bytes:
    b = bytearray(data)
    op = rng.randrange(9)
    n = len(b)
    if op == 0 and n:  # flip bits
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(n)] ^= 1 << rng.randrange(8)
    elif op == 1 and n:  # an interesting byte
        b[rng.randrange(n)] = rng.choice(INTERESTING_BYTES)
    elif op == 2 and n:  # an interesting integer, 1 to 8 bytes little-endian
        width = rng.choice([1, 2, 4, 8])
        at = rng.randrange(max(1, n - width + 1))
        value = rng.choice(INTERESTING_INTS + [n, n - 1, n + 1, n - 8, n + 8]) % (1 << (8 * width))
        b[at:at + width] = value.to_bytes(width, "little")
    elif op == 3:  # insert random bytes
        at = rng.randint(0, n)
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif op == 4 and n:  # delete a range
        at = rng.randrange(n)
        del b[at:at + rng.randint(1, max(1, n // 4))]
    elif op == 5 and n:  # duplicate a range elsewhere
        at, length = rng.randrange(n), rng.randint(1, max(1, n // 4))
        chunk = bytes(b[at:at + length])
        to = rng.randint(0, n)
        b[to:to] = chunk
    elif op == 6 and n:  # truncate
        del b[rng.randrange(n):]
    elif op == 7 and donors:  # splice with another valid file of the same name
        other = rng.choice(donors)
        cut_a, cut_b = rng.randint(0, n), rng.randint(0, len(other))
        b = b[:cut_a] + bytearray(other[cut_b:])
    else:  # append junk
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(b)


# -- JSON ----------------------------------------------------------------------------------------


def mutate_json_bytes(rng: random.Random, data: bytes, donors: list[bytes]) -> bytes:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return mutate_bytes(rng, data, donors)
    grafts = []
    for d in donors[:8]:
        try:
            grafts.append(json.loads(d))
        except (ValueError, RecursionError):
            pass
    if rng.random() < 0.05:
        return deep_nesting(rng, value)
    if _is_manifest(value) and rng.random() < 0.6:
        value = mutate_manifest(rng, value)
    else:
        value = mutate_json(rng, value, grafts)
    return dump_json(rng, value)


DEEP = "\x00deep\x00"


def deep_nesting(rng: random.Random, value: Any) -> bytes:
    """One node replaced by lists nested deeper than Python's parser can recurse, written as
    text (json.dumps itself cannot write them)."""
    value = json.loads(json.dumps(value))
    value = _set(value, rng.choice(_nodes(value)), DEEP)
    depth = rng.choice([1000, 3000, 100_000])
    opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
    return dump_json(rng, value).replace(json.dumps(DEEP).encode(), opener * depth + b"0" + closer * depth, 1)


def _is_manifest(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("tensors"), list) and \
        all(isinstance(t, dict) for t in value["tensors"]) and bool(value["tensors"])


ENCODING_SPECS = ["lossless", "int8", "int4", "nf4", "fp4", "1bit", "lowrank:1", "lowrank:2", "lowrank:3",
                  "lowrank:64"]
DTYPE_NAMES = ["F32", "BF16", "F16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"]
PART_NAMES = ["raw", "xor", "codes", "scales", "data", "absmax", "code", "signs", "us", "vh"]


def mutate_manifest(rng: random.Random, m: dict) -> dict:
    """Changes a manifest's checks let through (right types, wrong meaning), so that decoding
    meets params, shapes, dtypes and parts that do not fit its objects."""
    m = json.loads(json.dumps(m))
    entries = m["tensors"]
    e = rng.choice(entries)
    op = rng.randrange(8)
    if op == 0 and isinstance(e.get("params"), dict) and e["params"]:
        k = rng.choice(list(e["params"]))
        old = e["params"][k]
        if isinstance(old, int) and not isinstance(old, bool):
            e["params"][k] = rng.choice([old + 1, old - 1, 0, -1, 1, old * 2, 2**31, 200, -200, 64, 4096, 10**9])
        else:
            e["params"][k] = rng.choice(["raw", "xor", "bf16", "fp16", "fp32", "nf4", "fp4", "F32", [1], [2**40]])
    elif op == 1:
        e["encoding"] = rng.choice(ENCODING_SPECS)
    elif op == 2:
        e["dtype"] = rng.choice(DTYPE_NAMES)
    elif op == 3 and isinstance(e.get("shape"), list):
        shape = e["shape"]
        choice = rng.randrange(4)
        if choice == 0 and shape:
            i = rng.randrange(len(shape))
            shape[i] = max(0, shape[i] + rng.choice([-1, 1, 7, 1000]))
        elif choice == 1:
            shape.reverse()
        elif choice == 2:
            e["shape"] = [math.prod(shape)] if shape else [1]
        else:
            e["shape"] = shape + [1] if rng.random() < 0.5 else shape[1:]
    elif op == 4 and len(entries) > 1:  # another entry's parts, params or both
        other = rng.choice(entries)
        for k in rng.choice([["objects"], ["params"], ["objects", "params"], ["objects", "params", "encoding"]]):
            if k in other:
                e[k] = json.loads(json.dumps(other[k]))
    elif op == 5 and isinstance(e.get("objects"), dict) and e["objects"]:
        k = rng.choice(list(e["objects"]))
        e["objects"][rng.choice(PART_NAMES)] = e["objects"].pop(k)
    elif op == 6 and isinstance(e.get("objects"), dict) and e["objects"]:
        o = e["objects"][rng.choice(list(e["objects"]))]
        if isinstance(o, dict) and isinstance(o.get("size"), int):
            o["size"] = rng.choice([0, o["size"] + 1, max(0, o["size"] - 1), o["size"] * 2, 2**39])
    else:
        e["base"] = rng.choice([None, e.get("target"), e.get("result")])
    return m


def dump_json(rng: random.Random, value: Any) -> bytes:
    style = rng.randrange(4)
    try:
        if style == 0:
            return json.dumps(value, indent=1).encode()
        if style == 1:
            return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode()
        return json.dumps(value, sort_keys=rng.random() < 0.5, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8", "surrogatepass")
    except (ValueError, RecursionError, TypeError):
        return b"{}"


def _nodes(value: Any, path: tuple = (), out: list | None = None, limit: int = 4000) -> list[tuple]:
    """Paths to every node of a JSON value (up to `limit` of them)."""
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    out.append(path)
    if isinstance(value, dict):
        for k, v in value.items():
            _nodes(v, path + (k,), out, limit)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _nodes(v, path + (i,), out, limit)
    return out


def _get(value: Any, path: tuple) -> Any:
    for p in path:
        value = value[p]
    return value


def _set(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    parent = _get(value, path[:-1])
    parent[path[-1]] = new
    return value


def interesting_value(rng: random.Random, old: Any, grafts: list[Any]) -> Any:
    r = rng.randrange(12)
    if r == 0:
        return rng.choice(INTERESTING_INTS)
    if r == 1:
        return rng.choice(INTERESTING_FLOATS)
    if r == 2:
        return rng.choice(INTERESTING_STRINGS)
    if r == 3:
        return rng.choice([None, True, False, [], {}, [0], {"": 0}])
    if r == 4 and isinstance(old, bool):
        return not old
    if r == 4 and isinstance(old, int):  # near the old value
        return rng.choice([old + 1, old - 1, old * 2, old // 2, -old, old + 8, old * 1000, 0])
    if r == 4 and isinstance(old, float):
        return rng.choice([old * 2, -old, old * 1e30, old * 1e-30, 0.0])
    if r == 5 and isinstance(old, str):
        s = rng.choice(["", "/", "..", "\x00", "\\", "\n", "x" * rng.choice([1, 100, 2000, 100_000])])
        at = rng.randint(0, len(old))
        return old[:at] + s + old[at:]
    if r == 6:  # deep nesting
        depth = rng.choice([50, 500, 990, 5000])
        deep: Any = 0
        for _ in range(depth):
            deep = [deep]
        return deep
    if r == 7:  # a long list or a wide object
        n = rng.choice([100, 10_000, 100_000])
        return [0] * n if rng.random() < 0.5 else {f"k{i}": i for i in range(min(n, 10_000))}
    if r == 8 and grafts:  # a subtree of another valid file (e.g. another encoding's params)
        donor = rng.choice(grafts)
        nodes = _nodes(donor)
        return json.loads(json.dumps(_get(donor, rng.choice(nodes)))) if nodes else old
    if r == 9 and isinstance(old, list) and old:
        return old * rng.choice([2, 3])
    if r == 10 and isinstance(old, (int, float)) and not isinstance(old, bool):
        return str(old)
    if r == 11 and isinstance(old, str) and old.lstrip("-").isdigit() and len(old) < 30:
        return int(old)
    return rng.choice(INTERESTING_INTS + INTERESTING_STRINGS)


def mutate_json(rng: random.Random, value: Any, grafts: list[Any]) -> Any:
    value = json.loads(json.dumps(value))  # a private copy
    nodes = _nodes(value)
    path = rng.choice(nodes)
    node = _get(value, path)
    op = rng.randrange(7)
    if op == 0 and isinstance(node, dict) and node:  # drop a key
        del node[rng.choice(list(node))]
    elif op == 1 and isinstance(node, dict) and node:  # rename a key
        k = rng.choice(list(node))
        node[rng.choice(INTERESTING_STRINGS + [k + "x", k.upper()])] = node.pop(k)
    elif op == 2 and isinstance(node, dict):  # add a key
        node[rng.choice(INTERESTING_STRINGS)] = interesting_value(rng, None, grafts)
    elif op == 3 and isinstance(node, list) and node:  # drop, duplicate or swap elements
        i = rng.randrange(len(node))
        choice = rng.randrange(3)
        if choice == 0:
            del node[i]
        elif choice == 1:
            node.insert(rng.randint(0, len(node)), json.loads(json.dumps(node[i])))
        else:
            j = rng.randrange(len(node))
            node[i], node[j] = node[j], node[i]
    elif op == 4 and len(nodes) > 1:  # copy one node over another of the same file
        src = _get(value, rng.choice(nodes))
        value = _set(value, path, json.loads(json.dumps(src)))
    else:
        value = _set(value, path, interesting_value(rng, node, grafts))
    return value


# -- safetensors ---------------------------------------------------------------------------------


def split_safetensors(data: bytes) -> tuple[Any, bytes] | None:
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        return None
    try:
        return json.loads(data[8:8 + n]), data[8 + n:]
    except (ValueError, RecursionError):
        return None


def join_safetensors(header: bytes, body: bytes, *, pad: bool = True) -> bytes:
    if pad:
        header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + body


def mutate_safetensors(rng: random.Random, data: bytes, donors: list[bytes]) -> bytes:
    parts = split_safetensors(data)
    if parts is None:
        return mutate_bytes(rng, data, donors)
    header, body = parts
    op = rng.randrange(10)
    if op == 0 and rng.random() < 0.2:
        return join_safetensors(deep_nesting(rng, header), body)
    if op < 6:  # a field of the header
        grafts = [p[0] for p in (split_safetensors(d) for d in donors[:8]) if p]
        header = mutate_json(rng, header, grafts)
    elif op == 6 and isinstance(header, dict):  # a tensor's offsets or shape, consistently
        names = [k for k in header if k != "__metadata__" and isinstance(header[k], dict)]
        if names:
            t = header[rng.choice(names)]
            if isinstance(t.get("shape"), list) and t["shape"]:
                i = rng.randrange(len(t["shape"]))
                old = t["shape"][i]
                t["shape"][i] = rng.choice([0, 1, 10**6, 10**12, 2**63 - 1] + ([old + 1] if isinstance(old, int) else []))
            elif isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2:
                t["data_offsets"][rng.randrange(2)] = rng.choice(INTERESTING_INTS)
    elif op == 7 and isinstance(header, dict) and isinstance(header.get("__metadata__"), dict):
        # The manifest a hub payload file carries in its metadata, mutated as JSON itself.
        meta = header["__metadata__"]
        keys = [k for k, v in meta.items() if isinstance(v, str) and v.startswith("{")]
        if keys:
            k = rng.choice(keys)
            meta[k] = mutate_json_bytes(rng, meta[k].encode(), []).decode("utf-8", "replace")
    elif op == 8:  # a body of another length
        body = body[:rng.randrange(len(body) + 1)] if rng.random() < 0.5 else body + bytes(rng.randint(1, 64))
    else:  # the header length prefix
        raw = dump_json(rng, header)
        value = rng.choice(INTERESTING_INTS + [len(raw) + 1, len(raw) - 1, len(raw) + len(body) + 1]) % (1 << 64)
        return struct.pack("<Q", value) + raw + body
    return join_safetensors(dump_json(rng, header), body, pad=rng.random() < 0.9)


# -- object files --------------------------------------------------------------------------------

OBJECT_HEADER = struct.Struct("<4sBBHQ")


def mutate_object(rng: random.Random, data: bytes) -> bytes:
    if len(data) < OBJECT_HEADER.size:
        return data + bytes(OBJECT_HEADER.size - len(data))
    magic, version, compression, reserved, declared = OBJECT_HEADER.unpack_from(data)
    body = data[OBJECT_HEADER.size:]
    op = rng.randrange(6)
    if op == 0:
        declared = rng.choice(INTERESTING_INTS + [declared + 1, declared - 1, declared * 2, declared * 1000,
                                                  len(body), len(body) * 32768, len(body) * 32768 + 1]) % (1 << 64)
    elif op == 1:
        compression = rng.choice([0, 1, 2, 255])
    elif op == 2:
        version = rng.choice([0, 2, 255])
    elif op == 3:  # a second frame (or a copy of the body) after the first
        body = body + body[:rng.randint(0, len(body))]
    elif op == 4:  # a skippable zstd frame in front
        body = struct.pack("<II", 0x184D2A50, 4) + b"skip" + body
    else:
        magic = rng.choice([b"DSOB", b"DSoB", b"\0\0\0\0"])
    return OBJECT_HEADER.pack(magic, version, compression, reserved, declared) + body
