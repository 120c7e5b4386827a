"""Base records (schema/FORMAT.md §5): what a base's catalog rows give as its base record and
its tensor list, whether a record agrees with its tensor list (wherever one comes in: a pull,
a clone, a rebuild), and where a base's rows say other than its weights do.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..core.errors import cut
from ..core.hashing import DTYPE_SIZES, canonical_json, is_id

BASE_FORMAT = "deltastore/base/1"


def base_record(base: str, nbytes: int, tensors: list[dict]) -> dict:
    """The base record object's content: what a commit and an apply need of each base tensor."""
    return {"format": BASE_FORMAT, "base": base, "bytes": nbytes,
            "tensors": [{"name": t["name"], "dtype": t["dtype"], "shape": json.loads(t["shape"]),
                         "tensor": t["tensor_id"], "sq_norm": t["sq_norm"]} for t in sorted(tensors, key=lambda t: t["name"])]}


def base_list(tensors: list[dict]) -> bytes:
    """The base's tensor list, whose object id is the base id."""
    return canonical_json(sorted([t["name"], t["tensor_id"]] for t in tensors))


def base_record_problem(listing: bytes, record: bytes, base: str) -> str | None:
    """Why `record` is not the base record of the base whose tensor list is `listing`, or None:
    its fields and types (FORMAT.md §5), its tensors exactly the list's, sorted, `bytes` what
    their dtypes and shapes take, a squared norm finite and not negative, canonical JSON. What
    the list cannot tell (whether a squared norm is the tensor's) the weights tell
    (`weights_disagree`)."""
    try:
        rec, pairs = json.loads(record), json.loads(listing)
    except (ValueError, RecursionError):
        return "it is not JSON"
    if not isinstance(rec, dict) or set(rec) != {"format", "base", "bytes", "tensors"} \
            or rec["format"] != BASE_FORMAT or rec["base"] != base or not isinstance(rec["tensors"], list):
        return f"it is not a {BASE_FORMAT} record of base {base}"
    total = 0
    for t in rec["tensors"]:
        problem = _tensor_problem(t)
        if problem:
            return problem
        total += math.prod(t["shape"]) * DTYPE_SIZES[t["dtype"]]
    if [[t["name"], t["tensor"]] for t in rec["tensors"]] != pairs:
        return "its tensors are not those of the base's tensor list (names and tensor ids, by name)"
    if not _is_count(rec["bytes"]) or rec["bytes"] != total:
        return f"it says the weights take {cut(rec['bytes'], 24)} bytes; its tensors' dtypes and shapes take {total}"
    if canonical_json(rec) != bytes(record):
        return "it is not in canonical form"
    return None


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _tensor_problem(t: Any) -> str | None:
    if not isinstance(t, dict) or set(t) != {"name", "dtype", "shape", "tensor", "sq_norm"}:
        return "a tensor of it does not have the fields name, dtype, shape, tensor, sq_norm"
    name = cut(t["name"])
    if not isinstance(t["name"], str) or t["dtype"] not in DTYPE_SIZES or not isinstance(t["shape"], list) \
            or not all(_is_count(d) for d in t["shape"]) or not isinstance(t["tensor"], str) or not is_id(t["tensor"]):
        return f"tensor {name} has a name, dtype, shape or tensor id of the wrong form"
    n = t["sq_norm"]
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0):
        return f"tensor {name} has a squared norm that is not a finite number at least 0"
    return None


def weights_disagree(recorded: list[dict], recorded_bytes: int, described: list[dict], described_bytes: int) -> str | None:
    """Where a base's catalog rows (its record) say other than its weights do (both as
    `base_tensors` rows): None when they agree. Squared norms agree within a relative 1e-4:
    float32 sums of millions of squares round differently with the order of the additions
    (another CPU's vector width, numpy's blocks or torch's), by a few 1e-6 on a large tensor;
    what the norm is for (a commit's not-a-fine-tune check) needs nothing finer."""
    mine = {t["name"]: t for t in recorded}
    wrong = []
    for t in described:
        r = mine.get(t["name"])
        if r is None or r["tensor_id"] != t["tensor_id"]:
            return None  # other weights: the record is no worse than before (the caller checked the id)
        if r["dtype"] != t["dtype"] or json.loads(r["shape"]) != json.loads(t["shape"]) \
                or not _close(r["sq_norm"], t["sq_norm"]):
            wrong.append((t["name"], r, t))
    if not wrong and recorded_bytes == described_bytes:
        return None
    if not wrong:
        return f"it says the weights take {recorded_bytes} bytes; they take {described_bytes}"
    name, r, t = wrong[0]
    return (f"{len(wrong)} of its {len(described)} tensors differ from the weights (e.g. {cut(name)}: recorded "
            f"{r['dtype']} {r['shape']} with squared norm {r['sq_norm']!r}, the weights give {t['dtype']} "
            f"{t['shape']} with {t['sq_norm']!r})")


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-30)
