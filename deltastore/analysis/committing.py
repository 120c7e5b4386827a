"""A commit as a user asks for one: the plain `Store.commit`, or, when fidelity is asked for
(prompts, a KL bound, `encoding="auto"`), the measured commit of auto.py; the rules that
tie those options together, and the metadata read from a file. The one call behind
`deltastore commit`."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .auto import AutoChoice, commit_measured
from ..metrics.calibration import calibrate
from ..core.errors import OptionConflict
from ..engine.history import read_metadata_file
from ..repo.records import CommitResult
from ..store import Store


@dataclass(frozen=True)
class Committed:
    """The version committed, and, where fidelity was measured, the encoding chosen with every
    candidate's figures."""

    result: CommitResult
    choice: AutoChoice | None = None

    def to_json(self) -> dict:
        """`commit --json`."""
        out = self.result.to_json()
        c = self.choice
        if c is not None:
            out.update(encoding=c.encoding, kl=c.kl, top1=c.top1, base_kl=c.base_kl, max_kl=c.max_kl,
                       max_bytes=c.max_bytes,
                       candidates=[{"encoding": r.spec, "bytes": r.bytes, "kl": r.kl, "top1": r.top1, "note": r.note}
                                   for r in c.candidates])
        return out


def commit(store: Store, stance: str, model: Any, *, base: Any, encoding: str = "lossless",
           prompts: str | os.PathLike | Sequence[str] | None = None, max_kl: float | None = None,
           max_bytes: int | None = None, calibration: str | os.PathLike | None = None, chat: bool = False, tokenizer: str | os.PathLike | None = None,
           metadata: Mapping[str, str] | None = None, metadata_file: str | os.PathLike | None = None,
           progress: Callable[[int, int], None] | None = None, **options: Any) -> Committed:
    """Commit `model` as the next version of `stance`. With `prompts` (needed by `max_kl`,
    `chat`, `tokenizer` and `encoding="auto"`, which needs `max_kl` too) its fidelity is
    measured and recorded (`auto.commit_measured`); else it is `Store.commit`. With
    `calibration` (a prompts file) the encodings fitted to the model's activations
    (`mixedrank-aw:R`) are fitted on those prompts, and the version records them. Metadata from
    `metadata_file` (a flat JSON object) first, `metadata` over it. `options` go to the commit
    as they are (selection, message, tag, guards)."""
    measured = (encoding == "auto" or prompts is not None or max_kl is not None or max_bytes is not None
                or ((chat or tokenizer is not None) and calibration is None))  # --chat may go with --calibration
    if measured and (prompts is None or (encoding == "auto" and max_kl is None and max_bytes is None)):
        raise OptionConflict("--encoding auto needs --prompts FILE (one prompt per line) and --max-kl K "
                             "(e.g. 0.01) or --max-bytes B (e.g. 16MB)" if encoding == "auto" else
                             "--max-kl, --max-bytes, --chat and --tokenizer need --prompts FILE")
    if max_bytes is not None and encoding != "auto":
        raise OptionConflict("--max-bytes chooses an encoding: give it with --encoding auto")
    if measured and options.get("against") is not None:
        raise OptionConflict("--against does not combine with --prompts, --max-kl or --encoding auto: "
                             "`deltastore compare BASE MODEL --against REF --prompts FILE` measures it")
    meta = read_metadata_file(metadata_file) if metadata_file else {}
    if calibration is not None:
        # The encodings fitted to the activations get them per tensor; the version records
        # which prompts they came from.
        fitted = calibrate(model, calibration, chat=chat, tokenizer=tokenizer)
        options["encoding_options"] = {**(options.get("encoding_options") or {}), "calibration": fitted.covariances}
        meta.update(fitted.metadata)
    meta.update(metadata or {})
    if not measured:
        return Committed(store.commit(stance, model, base=base, encoding=encoding, metadata=meta,
                                      progress=progress, **options))
    m = commit_measured(store, stance, model, base=base, prompts=prompts, encoding=encoding, max_kl=max_kl,
                        max_bytes=max_bytes,
                        chat=chat, tokenizer=tokenizer, metadata=meta, progress=progress, **options)
    return Committed(m.result, m.choice)
