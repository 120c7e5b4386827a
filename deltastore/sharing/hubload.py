"""A model from a Hub repo of stances in one call: `deltastore.load(repo_id, stance=...)`.

It pulls the stance into a store (the one given, else the default store: `$DELTASTORE_DIR`, the
nearest `.deltastore/` upwards, else the user's store in the cache folder, created when first
needed), fetching the stance's base from the Hub at the commit the repo records when the store
lacks it (`pull --fetch-base`), loads that base with transformers from the Hugging Face cache's
snapshot of the commit, and applies the stance in place, every hash checked. The model carries
a handle, `model.deltastore`, that switches it to another stance of the repo (pulled when
needed) or reverts it to the base, bit for bit. The base's files in the cache are never written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import DeltastoreError, ModelFormatError, StoreNotFound
from .hub import pull
from .hubbase import fetch_base
from ..repo.records import Base, Version
from ..store import Store, find_store

HANDLE_ATTRIBUTE = "deltastore"  # model.deltastore: the handle load() leaves on the model


@dataclass
class LoadedStance:
    """What `load` applied to a model, and how to change it."""

    model: Any
    store: Store
    repo_id: str
    ref: str | None  # the stance (ref) applied now; None: the model is at its base
    revision: str | None = None
    token: str | None = None
    endpoint: str | None = None
    cache_dir: str | os.PathLike | None = None

    @property
    def version(self) -> Version | None:
        return self.store.resolve(self.ref) if self.ref is not None else None

    def switch(self, ref: str) -> None:
        """Apply another stance of the repo instead (pulled first when the store lacks it);
        on failure the model keeps the stance it had."""
        _pull_stance(self.store, self.repo_id, ref, revision=self.revision, token=self.token,
                     endpoint=self.endpoint, cache_dir=self.cache_dir)
        self.store.switch(self.model, ref)
        self.ref = ref

    def revert(self) -> None:
        """Put the base's exact bytes back."""
        self.store.switch(self.model, None)
        self.ref = None


def load(repo_id: str, stance: str, *, store: Store | str | os.PathLike | None = None,
         revision: str | None = None, token: str | None = None, endpoint: str | None = None,
         cache_dir: str | os.PathLike | None = None, **from_pretrained_kwargs: Any) -> Any:
    """A transformers AutoModelForCausalLM of the base `stance` was made on, at its pinned
    commit, with `stance` (STANCE, STANCE@N or STANCE@TAG) of the Hub repo `repo_id` applied in
    place; `model.deltastore` switches or reverts it. `store`: a Store or its folder (default:
    the default store). `revision`, `token`, `endpoint`, `cache_dir`: of the Hub and its cache,
    for the stances and the base alike. Everything else goes to `from_pretrained` (`dtype`
    defaults to the checkpoint's own: a stance applies only to the exact base weights)."""
    store = _open(store)
    _pull_stance(store, repo_id, stance, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir)
    base = store.base(store.resolve(stance).base_id)
    folder = _base_folder(store, base, token=token, endpoint=endpoint, cache_dir=cache_dir)
    # transformers is imported here only: it is slow to import, and only load needs it.
    from transformers import AutoModelForCausalLM

    if "dtype" not in from_pretrained_kwargs and "torch_dtype" not in from_pretrained_kwargs:
        from_pretrained_kwargs["dtype"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(folder, **from_pretrained_kwargs)
    handle = LoadedStance(model, store, repo_id, None, revision, token, endpoint, cache_dir)
    handle.switch(stance)
    setattr(model, HANDLE_ATTRIBUTE, handle)
    return model


def default_store() -> Store:
    """`$DELTASTORE_DIR`, else the nearest `.deltastore/` upwards, else the user's store in the
    cache folder (`$XDG_CACHE_HOME/deltastore`, default `~/.cache/deltastore`); one that does
    not exist yet is created."""
    try:
        root = find_store()
    except StoreNotFound:
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(cache) / "deltastore"
    try:
        return Store.open(root)
    except StoreNotFound:
        return Store.init(root)


def _open(store: Store | str | os.PathLike | None) -> Store:
    if isinstance(store, Store):
        return store
    return default_store() if store is None else Store.open(store)


def _pull_stance(store: Store, repo_id: str, ref: str, **hub: Any) -> None:
    """Pull the stance `ref` names from the repo, with its base. Always asked of the repo, even
    when the store resolves the ref: a local stance of that name that is not the repo's is then
    refused (LocalStanceDiffers) rather than applied in its place."""
    pull(store, repo_id, stance=ref.split("@", 1)[0], fetch_base=True, progress=False, **hub)


def _base_folder(store: Store, base: Base, **hub: Any) -> Path:
    """The base's model folder: where it was registered, fetched again from its Hub origin when
    the cache no longer holds it."""
    if not (base.source and Path(base.source).is_dir()) and base.hub_id:
        base = fetch_base(store, base.hub_id, revision=base.hub_revision, expected_id=base.id, progress=False,
                          **hub)
    if not base.source or not Path(base.source).exists():
        raise ModelFormatError(f"the weights of base {base.name or base.id[:19]} are not at "
                               f"{base.source or '(unknown)'} any more, and its Hub id is not recorded; "
                               "register them again with `deltastore base add`")
    folder = Path(base.source)
    if not (folder / "config.json").is_file():
        raise DeltastoreError(f"base {base.name or base.id[:19]} at {folder} is not a transformers model folder "
                              "(no config.json); load it yourself and apply the stance with Store.apply")
    return folder
