"""mixedrank:R through the whole store: commit, in-place and live apply, export, revert and
fsck give one result, checked by its recorded id, and revert is bit-exact."""

from __future__ import annotations

import shutil

import torch

from deltastore import Store

from helpers import file_bytes, load_folder, make_model, module_snapshot, run_json, tiny_net


def test_a_mixedrank_version_applies_exports_and_reverts_as_every_encoding_does(tmp_path) -> None:
    pair = make_model(tmp_path, torch.bfloat16, hidden=32)
    root = tmp_path / "store"
    with Store.init(root) as store:
        v = store.commit("s", pair.ft, base=pair.base, encoding="mixedrank:4").version
        assert {e.encoding for e in v.tensors if len(e.shape) == 2} == {"mixedrank:4"}
        exported = tmp_path / "exported"
        store.export("s", exported)

        target = tmp_path / "target"
        shutil.copytree(pair.base, target)
        store.apply_files("s", target)
        assert load_folder(target).keys() == load_folder(exported).keys()
        assert all(torch.equal(load_folder(target)[n], t) for n, t in load_folder(exported).items())
        store.revert_files(target)
        assert file_bytes(target) == file_bytes(pair.base)

        module = tiny_net(torch.bfloat16, hidden=32)
        before = module_snapshot(module)
        store.apply(module, "s")
        live = {n: p.detach() for n, p in module.state_dict().items()}
        changed = [n for n in pair.changed if n in live]
        assert changed and all(torch.equal(live[n], load_folder(exported)[n]) for n in live)
        store.revert(module)
        assert module_snapshot(module) == before
        assert store.fsck(read_data=True).ok
    shown = run_json(root, "show", "s@1", "--json")
    assert "mixedrank:4" in str(shown)
