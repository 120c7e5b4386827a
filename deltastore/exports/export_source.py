"""What every export reads: a version's tensors as applied, with the names it changed against its
base, and the base folder's config.json with its Hugging Face architecture.

Only the public API of ``Store`` is used; nothing here writes. This module never imports click,
prints or exits.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TYPE_CHECKING

if TYPE_CHECKING:  # Store for types only: nothing here needs store.py loaded
    from ..store import Store

__all__ = ["architecture", "changed_tensors", "model_config"]


def changed_tensors(store: Store, version: Any, base: Any, source: Any) -> tuple[Any, Callable[[str], Any], list[str]]:
    """(infos, tensor, changed) of ``version`` applied to ``base``, whose weights ``source`` reads:
    ``store.materialize``'s description and reader of every tensor, and the names whose result is
    not the base's tensor, in the version's order."""
    infos, tensor = store.materialize(version, base_weights=source)
    base_ids = {n: r["tensor_id"] for n, r in store.base_tensors(base).items()}
    changed = [e.name for e in version.tensors if e.result_tensor_id != base_ids.get(e.name)]
    return infos, tensor, changed


def model_config(folder: str | Path | None, error: Callable[[str], Exception], missing: str, *,
                 what: str = "a model config (JSON with \"architectures\")") -> dict[str, Any]:
    """The JSON object of ``folder``'s config.json. Without one, ``error(missing)`` is raised; where
    it is unreadable or not a JSON object, ``error`` says that the file is not ``what``."""
    path = Path(folder) / "config.json" if folder is not None else None
    if path is None or not path.is_file():
        raise error(missing)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        config = None
    if not isinstance(config, dict):
        raise error(f"{path} is not {what}")
    return config


def architecture(config: dict[str, Any]) -> str:
    """The model class a config names first in ``architectures`` ("LlamaForCausalLM"), or "unknown"."""
    names = config.get("architectures") or []
    return str(names[0]) if isinstance(names, list) and names else "unknown"
