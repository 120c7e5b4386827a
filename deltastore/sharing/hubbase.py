"""Bases from the Hugging Face Hub: a model repo fetched at one commit into the Hugging Face
cache and registered where it lies, with its Hub id and that commit, so that a base records
which weights it is, not only a name (FORMAT.md §6, §9).

Only what a model loads with is fetched: its safetensors weights (and their index), config,
generation config and tokenizer files. A repo whose weights are pickle checkpoints only is
refused before anything is downloaded. Nothing is copied out of the cache (`cache_dir`, else
HF_HUB_CACHE or HF_HOME as huggingface_hub reads them): the base's source is the cache's
snapshot folder of that commit, whose files are links into the cache's blobs, which an in-place
apply refuses to write. This module writes to the store only through `Store.add_base`.

    ~/.cache/huggingface/hub/models--Qwen--Qwen2-0.5B/
      blobs/<sha256>                   the files' contents
      snapshots/<commit>/              the base's source
        config.json -> ../../blobs/…
        model.safetensors -> ../../blobs/…
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

from ..core.errors import HubRevisionNotFound, ModelFormatError, PickleRefused, ReadOnlyStore
from .hubclient import client, hub_errors, progress_bars
from ..weights.models import INDEX_FILE, PICKLE_SUFFIXES
from ..repo.records import Base
from ..store import Store

# Beside the weights, the files from_pretrained reads for a causal LM and its tokenizer.
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "vocab.txt",
               "merges.txt", "chat_template.jinja", "chat_template.json")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# A Hub repo id (`name` or `namespace/name`), optionally `@revision`: what `base add` fetches
# when no file or folder of that name exists.
_HUB_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?(@[^\s@]+)?")


def is_commit(text: Any) -> bool:
    return isinstance(text, str) and _COMMIT.fullmatch(text) is not None


def split_hub_ref(text: str) -> tuple[str, str | None]:
    """`HUB_ID[@REVISION]` -> (repo id, revision or None)."""
    repo, _, revision = text.partition("@")
    return repo, revision or None


def looks_like_hub_ref(text: str) -> bool:
    """Whether `text` could name a Hub repo rather than a weights file that is missing."""
    repo = split_hub_ref(text)[0]
    return (_HUB_REF.fullmatch(text) is not None and ".." not in repo
            and not repo.endswith((".safetensors", ".json", *PICKLE_SUFFIXES)))


def weight_patterns(files: list[str], repo_id: str, commit: str) -> list[str]:
    """The files of a repo (at `commit`) to fetch for a base: its safetensors weights at the top
    of the repo, as `models.weight_files` will read them, and the model files present."""
    top = [f for f in files if "/" not in f]
    weights = sorted(f for f in top if f.endswith(".safetensors"))
    if not weights:
        pickles = sorted(f for f in top if f.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise PickleRefused(f"Hub repo {repo_id} at {commit[:12]} has no .safetensors weights, and its "
                                f"{pickles[0]}")
        raise ModelFormatError(f"Hub repo {repo_id} at {commit[:12]} holds no .safetensors weights")
    if "model.safetensors" in weights:
        weights = ["model.safetensors"]
    elif INDEX_FILE in top:
        weights = [INDEX_FILE, *weights]
    return weights + [f for f in MODEL_FILES if f in top]


def fetch_base(store: Store, repo_id: str, *, revision: str | None = None, name: str | None = None,
               expected_id: str | None = None, token: str | None = None, endpoint: str | None = None,
               cache_dir: str | os.PathLike | None = None, force_download: bool = False,
               progress: bool = True, hashing: Callable[[int, int], None] | None = None,
               verify: bool = False) -> Base:
    """Fetch a Hub model repo at `revision` (a branch, tag or commit; default: the default
    branch) into the Hugging Face cache and register it as a base, with its Hub id and the
    commit the revision named. `expected_id`: the base id the weights must have; other weights
    are refused (BaseMismatch) and nothing is registered. `hashing`: progress of the hashing."""
    if store.readonly:
        raise ReadOnlyStore(str(store.root))
    hf = client()
    api = hf.HfApi(endpoint=endpoint, token=token)
    with hub_errors(repo_id, revision, api.endpoint), progress_bars(progress):
        try:
            # Resolve the revision once: every file then comes from that one commit.
            info = api.model_info(repo_id, revision=revision)
        except hf.errors.RevisionNotFoundError:
            raise HubRevisionNotFound(repo_id, revision or "main",
                                      hint="give a branch, a tag or a full commit hash of the model repo") from None
        commit = info.sha
        patterns = weight_patterns([s.rfilename for s in info.siblings or []], repo_id, commit)
        folder = hf.snapshot_download(repo_id, revision=commit, allow_patterns=patterns, cache_dir=cache_dir,
                                      token=token, endpoint=endpoint, library_name="deltastore",
                                      force_download=force_download)
    return store.add_base(folder, name=name, hub_id=repo_id, hub_revision=commit, expected_id=expected_id,
                          progress=hashing, verify=verify)
