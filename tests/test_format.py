"""Golden tests: the identifiers, object header, manifest and catalog schema are part of the
format (schema/FORMAT.md). A change to any of them must fail here first."""

import json
from pathlib import Path

import blake3
import jsonschema
import pytest
import torch
from safetensors.torch import save_file

from deltastore import Store
from deltastore.core.hashing import base_id, canonical_json, manifest_id, tensor_id
from deltastore.repo.objects import HEADER, ObjectStore

SCHEMA = Path(__file__).resolve().parent.parent / "schema"


def test_tensor_id_is_pinned():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensor_id(t) == "b3:e73dd6d3a5b8bd3e3bc9386c11c682ae0e3c6b96b4b80a2178cb75de3f4993d0"
    assert tensor_id(t.to(torch.bfloat16)) == "b3:bf6db6559480e80e883235b03a09456605271dc09a6651a89eb1a58d76fc942d"
    assert tensor_id(torch.tensor(1.5)) == "b3:9b880f58ece4fac7c56454d523553847e9cd8d7dbb737a32eb9b60c5ebecf3f0"
    # The definition, spelled out: header line then raw little-endian bytes.
    expected = blake3.blake3(b"F32 3,4\n" + t.numpy().tobytes()).hexdigest()
    assert tensor_id(t) == f"b3:{expected}"


def test_base_id_and_canonical_json_are_pinned():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    ids = [("b", tensor_id(t)), ("a", tensor_id(torch.tensor(1.5)))]
    assert base_id(ids) == "b3:6199785f6755300446ad5b72e1636586b3b67c53c806b1c7c2e16abac34d73b4"
    assert base_id(reversed(ids)) == base_id(ids)
    assert canonical_json({"b": 1, "a": [1.5, "é"]}) == '{"a":[1.5,"é"],"b":1}'.encode()
    assert manifest_id({"format": "x", "tensors": [], "message": "é"}) == \
        "b3:10d9f93dc94baf47f2107167dd2157ad989bbb7c64e1b98016f360b0257b5f0f"


def test_object_header_is_pinned(tmp_path):
    objects = ObjectStore(tmp_path)
    payload = bytes(range(256)) * 64
    put = objects.put(payload)
    blob = objects.path(put.id).read_bytes()
    assert blob[:8] == b"DSOB\x01\x01\x00\x00"
    assert int.from_bytes(blob[8:16], "little") == len(payload)
    assert HEADER.size == 16
    assert put.id == f"b3:{blake3.blake3(payload).hexdigest()}"
    assert objects.path(put.id) == tmp_path / "objects" / put.id[3:5] / put.id[5:]


def test_manifests_follow_the_json_schema(tmp_path):
    torch.manual_seed(0)
    base = {"w": torch.randn(8, 8), "norm": torch.ones(8), "emb": torch.randn(4, 8).to(torch.bfloat16)}
    tuned = {k: (v.float() + 0.01 * torch.randn(v.shape)).to(v.dtype) for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    store = Store.init(tmp_path / "store")
    store.add_base(tmp_path / "base.safetensors", name="b")
    result = store.commit("s", tmp_path / "tuned.safetensors", base="b", metadata={"lr": "1e-3"})
    schema = json.loads((SCHEMA / "manifest.schema.json").read_text())
    manifest = result.version.manifest()
    jsonschema.validate(manifest, schema)
    assert manifest_id(manifest) == result.version.id
    # The manifest is the object its version id names, byte for byte.
    assert store.objects.get(result.version.id) == canonical_json(manifest)
    bad = dict(manifest, tensors=[dict(manifest["tensors"][0], name="../../x")])
    try:
        jsonschema.validate(bad, schema)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("the schema accepted a tensor name with '..'")
    # A version stored against another (FORMAT.md §5.1): format 2, the version and each tensor
    # it is against; a format-1 manifest naming one, or a format-2 one without, is refused.
    again = {k: (v.float() + 0.001 * torch.randn(v.shape)).to(v.dtype) for k, v in tuned.items()}
    save_file(again, tmp_path / "again.safetensors")
    chained = store.commit("t", tmp_path / "again.safetensors", base="b", against="s").version.manifest()
    jsonschema.validate(chained, schema)
    assert chained["format"] == "deltastore/version/2" and chained["against"] == result.version.id
    assert {t["name"] for t in chained["tensors"]} == {t["name"] for t in manifest["tensors"]}
    for wrong in (dict(chained, format="deltastore/version/1"), {k: v for k, v in chained.items() if k != "against"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
