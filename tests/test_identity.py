"""Identity: tensor ids and base ids, the same from every form a model takes."""

from __future__ import annotations

import blake3
import pytest
import torch
from safetensors.torch import save_file, save_model

from deltastore import Store
from deltastore.core.hashing import base_id, bytes_id, canonical_json, is_id, tensor_id
from deltastore.weights.models import open_model

from helpers import make_model, raw, saved_state, tiny_llama, tiny_net, write_folder


def source_base_id(model) -> str:
    source = open_model(model)
    return base_id((name, tensor_id(source.get(name))) for name in source.names)


# -- tensor ids ----------------------------------------------------------------------------------


def test_tensor_id_is_blake3_of_dtype_shape_and_bytes() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    expected = blake3.blake3(b"F32 2,3\n" + raw(t)).hexdigest()
    assert tensor_id(t) == "b3:" + expected
    assert is_id(tensor_id(t))


def test_tensor_id_depends_on_dtype_shape_and_bytes() -> None:
    t = torch.arange(12, dtype=torch.int16)
    same_bytes_other_dtype = t.view(torch.float16)
    same_bytes_other_shape = t.reshape(3, 4)
    flipped = t.clone()
    flipped[5] ^= 1
    ids = {tensor_id(x) for x in (t, same_bytes_other_dtype, same_bytes_other_shape, flipped)}
    assert len(ids) == 4
    # ...and on nothing else: a copy, or the same values through a non-contiguous view.
    assert tensor_id(t.clone()) == tensor_id(t)
    m = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensor_id(m.t()) == tensor_id(m.t().contiguous())
    assert tensor_id(torch.zeros(0, 4)) != tensor_id(torch.zeros(4, 0))


def test_tensor_id_of_a_bf16_tensor_hashes_its_bit_pattern() -> None:
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    b = a.clone()
    b.view(torch.int16)[1] ^= 1  # one unit in the last place
    assert tensor_id(a) != tensor_id(b)
    assert tensor_id(a) == "b3:" + blake3.blake3(b"BF16 3\n" + raw(a)).hexdigest()


# -- base ids ------------------------------------------------------------------------------------


def test_base_id_is_the_hash_of_the_sorted_name_id_list() -> None:
    pairs = [("b.weight", "b3:" + "1" * 64), ("a.weight", "b3:" + "2" * 64)]
    expected = bytes_id(canonical_json([["a.weight", "b3:" + "2" * 64], ["b.weight", "b3:" + "1" * 64]]))
    assert base_id(pairs) == expected
    assert base_id(reversed(pairs)) == expected


def test_base_id_same_from_file_folder_shards_state_dict_and_module(tmp_path) -> None:
    net = tiny_net(torch.float32)
    state = saved_state(net)
    single = tmp_path / "single.safetensors"
    save_file(state, single)
    folder = write_folder(tmp_path / "folder", state)
    sharded = write_folder(tmp_path / "sharded", state, shards=4)
    assert len(list(sharded.glob("*.safetensors"))) == 4

    ids = {
        "file": source_base_id(single),
        "folder": source_base_id(folder),
        "sharded": source_base_id(sharded),
        "state dict": source_base_id(net.state_dict()),
        "reversed state dict": source_base_id(dict(reversed(list(net.state_dict().items())))),
        "module": source_base_id(net),
    }
    assert len(set(ids.values())) == 1, ids


def test_base_id_counts_tied_weights_once(tmp_path) -> None:
    net = tiny_net(torch.float32, tied=True)
    assert net.head.weight is net.embed.weight
    save_model(net, str(tmp_path / "tied.safetensors"))
    source = open_model(net)
    assert ("embed.weight" in source) != ("head.weight" in source)  # one of the two, not both
    assert source_base_id(net) == source_base_id(tmp_path / "tied.safetensors")
    assert source_base_id(net.state_dict()) == source_base_id(net)
    # Untying it (two tensors with equal content) is another base: one more name.
    untied = tiny_net(torch.float32, tied=False)
    untied.load_state_dict({k: v for k, v in net.state_dict().items()})
    assert len(open_model(untied).names) == len(source.names) + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_model_with_tied_embeddings_same_id_as_its_folders(tmp_path, dtype) -> None:
    model = tiny_llama(dtype, tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="6KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1

    names = open_model(model).names
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert open_model(tmp_path / "one").names == names
    ids = {source_base_id(model), source_base_id(tmp_path / "one"), source_base_id(tmp_path / "sharded"),
           source_base_id(tmp_path / "one" / "model.safetensors"), source_base_id(model.state_dict())}
    assert len(ids) == 1


def test_base_id_changes_with_any_tensor_or_name(tmp_path) -> None:
    state = saved_state(tiny_net(torch.float32))
    reference = source_base_id(state)
    changed = dict(state)
    name = sorted(state)[3]
    changed[name] = state[name].clone()
    changed[name].view(torch.int32).reshape(-1)[0] ^= 1
    assert source_base_id(changed) != reference
    renamed = {("x." + k if k == name else k): v for k, v in state.items()}
    assert source_base_id(renamed) != reference
    fewer = {k: v for k, v in state.items() if k != name}
    assert source_base_id(fewer) != reference


def test_store_registers_one_base_whatever_form_it_is_given_in(tmp_path) -> None:
    pair = make_model(tmp_path, torch.bfloat16, llama=True, tied=True, sharded=True)
    store = Store.init(tmp_path / "store")
    from_folder = store.add_base(pair.base, name="tiny")
    from_module = store.add_base(pair.base_module)
    from_state = store.add_base(pair.base_state)
    assert from_folder.id == from_module.id == from_state.id
    assert [b.id for b in store.bases()] == [from_folder.id]
    base = store.bases()[0]
    assert base.name == "tiny"
    assert base.tensor_count == len(pair.base_state)
    assert base.bytes == sum(t.numel() * t.element_size() for t in pair.base_state.values())
    assert store.base("tiny").id == store.base(from_folder.id[:14]).id == from_folder.id


def test_aliases_dropped_as_safetensors_drops_them() -> None:
    # models.without_aliases is the rule of safetensors' save_model (its private
    # _remove_duplicate_names is the oracle here, never a dependency of the library).
    from safetensors.torch import _remove_duplicate_names

    from deltastore.core.errors import ModelFormatError
    from deltastore.weights.models import module_state, without_aliases

    for module in (tiny_llama(tied=True), tiny_net(tied=True), tiny_net(tied=False)):
        state = module.state_dict()
        tied = getattr(module, "_tied_weights_keys", None) or []
        discard = list(tied.keys()) if isinstance(tied, dict) else list(tied)
        removed = {n for names in _remove_duplicate_names(state, discard_names=discard).values() for n in names}
        assert set(without_aliases(state, discard=discard)) == set(state) - removed
        assert set(module_state(module)) == set(state) - removed
    # Without a discard list the first name in sorted order stays, as in safetensors.
    w = torch.zeros(4, 3)
    assert set(without_aliases({"b": w, "a": w, "c": torch.ones(2)})) == {"a", "c"}
    assert set(without_aliases({"b": w, "a": w}, discard=["a"])) == {"b"}
    # Two tensors over the same memory that are not one tensor cannot go under one name.
    buffer = torch.zeros(12)
    with pytest.raises(ModelFormatError, match="share memory"):
        without_aliases({"x": buffer[:8], "y": buffer[4:]})
    # Slices of one buffer that do not overlap are separate tensors.
    assert set(without_aliases({"x": buffer[:6], "y": buffer[6:]})) == {"x", "y"}
