"""The root of every error deltastore raises on purpose, and the errors more than one module raises.

One root, `DeltastoreError`, so that callers (and the CLI) can tell a user's mistake or a
damaged input from a bug. An error only one module raises lives beside it: `AlphaUnavailable`
(alpha.py), `FidelityError` (fidelity.py), `LoraError` (lora_plan.py) and `RefLogError` (reflog.py);
each subclasses `DeltastoreError`. Each subclass carries what went wrong as attributes and subclasses
the builtin that fits, so `except FileNotFoundError` keeps working for code that knows no
deltastore. Messages are one line: what is wrong, then what to do.
"""

from __future__ import annotations

import errno
import os

from typing import Any


class DeltastoreError(Exception):
    """Root of every error deltastore raises on purpose."""


# How much of a name from outside an error message shows.
SHOWN = 60


def cut(text: Any, limit: int = SHOWN) -> str:
    """A name or ref for a one-line message: its first `limit` characters, quoted, and its
    length when it is longer."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def short(object_id: str) -> str:
    """An id as people read it: `b3:` and its first 12 hex digits, enough to tell ids apart
    and to type as a prefix (a ref or a base takes 8 or more)."""
    return object_id[:15] if object_id.startswith("b3:") else object_id[:12]


class AnalysisError(DeltastoreError, ValueError):
    """A tensor or a request that cannot be analysed: shape mismatch, no such tensor, unknown
    heatmap value (analysis.py, refanalysis.py, plots.py)."""


class CompareError(DeltastoreError, ValueError):
    """A comparison or a measured commit that cannot be made: models that do not match, a bad
    selection spec, no encoding within the KL bound (compare.py, auto.py, plots.py)."""


class OptionConflict(DeltastoreError, ValueError):
    """Options of one call that do not go together, or one that needs another; the CLI shows
    it as a usage error (exit 2)."""


class StoreNotFound(DeltastoreError, FileNotFoundError):
    def __init__(self, path: str, *, searched_up: bool = False, nearest: str | None = None):
        self.path = path
        where = f"at {path} or above it" if searched_up else f"at {path}"
        # A store made elsewhere is what the user most likely means; `init` would make an
        # empty one that knows nothing of their versions or patched folders.
        then = (f"the nearest store this user has is {nearest}: pass `--store {nearest}`, or run from "
                f"{os.path.dirname(nearest)}" if nearest else "run `deltastore init` to create one")
        super().__init__(f"no deltastore store {where}; {then}")


class StoreExists(DeltastoreError, FileExistsError):
    def __init__(self, path: str):
        self.path = path
        super().__init__(f"a store already exists at {path}")


class ReadOnlyStore(DeltastoreError, PermissionError):
    def __init__(self, path: str, *, detail: str | None = None):
        self.path = path
        super().__init__(f"the store at {path} is read-only; " + (detail or "writes need write access to it"))


class ModelFormatError(DeltastoreError, ValueError):
    """A model file or folder that cannot be read as safetensors."""


class BaseWeightsMissing(ModelFormatError):
    """A command needs a base's weights and the store does not know where they are: it never
    did (a clone or a pull registers a base without its weights), or they moved."""

    def __init__(self, base: str, source: str | None):
        self.base = base
        self.source = source
        where = (f"the store holds no weights for base {base} (a clone or a pull registers a base without them)"
                 if source is None else f"the weights of base {base} are not at {source} any more")
        super().__init__(f"{where}; `deltastore base add PATH` with its weights records them for good, or pass "
                         "--base-path PATH for this command")


class PickleRefused(ModelFormatError):
    def __init__(self, path: str):
        self.path = path
        super().__init__(
            f"{path} is a pickle checkpoint, which deltastore never loads (it can run code); "
            "convert it to safetensors (save_pretrained(..., safe_serialization=True) or "
            "safetensors.torch.save_file)"
        )


class UnsafeInput(DeltastoreError, ValueError):
    """Input from outside that breaks a rule: a bad name, a size over its bound."""


class RefNotFound(DeltastoreError, KeyError):
    def __init__(self, ref: str, candidates: list[str] | None = None):
        self.ref = ref
        self.candidates = candidates or []
        hint = f"; did you mean {', '.join(self.candidates)}?" if self.candidates else \
            "; `deltastore stances` lists what there is"
        super().__init__(f"no version matches {cut(ref)}{hint}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


class VersionNeeded(DeltastoreError, ValueError):
    """A version delete refused: something still needs the version (its stance's only version,
    a tag, a patched folder, a version stored against it)."""

    def __init__(self, ref: str, needs: list[str]):
        self.ref = ref
        self.needs = needs
        super().__init__(f"cannot delete {ref}: {'; '.join(needs)}; nothing was changed")


class AmbiguousRef(DeltastoreError, LookupError):
    def __init__(self, ref: str, candidates: list[str]):
        self.ref = ref
        self.candidates = candidates
        super().__init__(
            f"{cut(ref)} matches {len(candidates)} versions ({', '.join(candidates)}); "
            "give more digits"
        )


class BaseNotFound(DeltastoreError, LookupError):
    def __init__(self, base: str, candidates: list[str] | None = None):
        self.base = base
        self.candidates = candidates or []
        hint = f"; known bases: {', '.join(self.candidates)}" if self.candidates else \
            "; register it with `deltastore base add MODEL`"
        super().__init__(f"no base matches {base!r}{hint}")


class BaseInUse(DeltastoreError, ValueError):
    """A base that versions are still made on cannot be removed."""

    def __init__(self, base: str, versions: list[str]):
        self.base = base
        self.versions = versions
        shown = ", ".join(versions[:5]) + (f" and {len(versions) - 5} more" if len(versions) > 5 else "")
        super().__init__(f"base {cut(base)} is the base of {len(versions)} version{'s' * (len(versions) != 1)} "
                         f"({shown}); it can be removed once no version uses it")


class BaseMismatch(DeltastoreError, ValueError):
    """A model is not the base a version (or a commit) was made against."""

    def __init__(self, expected: str, actual: str | None, names: list[str], detail: str = "", *,
                 message: str | None = None):
        """`message`: the whole line, when the caller can say more than the usual one."""
        self.expected = expected
        self.actual = actual
        self.names = names
        got = f", got {short(actual)}" if actual else ""
        super().__init__(
            message or f"not the expected base (expected {short(expected)}{got}): {detail or 'tensors differ'}: "
            f"{shown_names(names)}; use the model the version was made from"
        )


def shown_names(names: list[str], first: int = 5) -> str:
    return ", ".join(names[:first]) + (f" and {len(names) - first} more" if len(names) > first else "")


class CorruptObject(DeltastoreError, ValueError):
    def __init__(self, object_id: str, reason: str):
        self.object_id = object_id
        self.reason = reason
        super().__init__(
            f"object {object_id} is corrupt ({reason}); run `deltastore fsck` to see what it breaks"
        )


class ResultMismatch(DeltastoreError, ValueError):
    """A tensor decoded to other bytes than the result id its version recorded at commit. The
    one wording of that check, wherever a version is decoded (apply, prepare, patch, export).
    ``untouched`` names what the failure left as it was ("nothing was changed"). Raised by
    ``TensorEntry.check_result``."""

    def __init__(self, tensor: str, ref: str, *, untouched: str | None = None):
        self.tensor = tensor
        self.ref = ref
        super().__init__(
            f"tensor {cut(tensor)} of {ref} decodes to other bytes than at commit (a corrupt object, or "
            f"another torch build's arithmetic){'; ' + untouched if untouched else ''}; "
            "`deltastore fsck --read-data` checks the objects"
        )


class MissingObject(DeltastoreError, FileNotFoundError):
    def __init__(self, object_id: str):
        self.object_id = object_id
        super().__init__(
            f"object {object_id} is missing from the store; run `deltastore fsck` to see what it breaks"
        )


class EncodingError(DeltastoreError, ValueError):
    """An unknown encoding or bad encoding parameters."""


class SelectionError(DeltastoreError, ValueError):
    """A selection that cannot be applied (a regex matching nothing, a bad number)."""


class JournalError(DeltastoreError, RuntimeError):
    """An in-place apply that cannot start, or cannot be reverted."""


class SharedFile(JournalError):
    """A weight file that another path shares (`kind`: "symlink" or "hardlink"), which an
    in-place patch would change for that path too."""

    def __init__(self, path: str, kind: str, message: str):
        self.path = path
        self.kind = kind
        super().__init__(message)


class PatchBusy(JournalError):
    """Another apply or revert holds the lock of the target (`pid`: its process, when known)."""

    def __init__(self, pid: int | None, waited: float, target: str):
        self.pid = pid
        self.target = target
        holder = f"process {pid}" if pid else "another process (working with another store?)"
        super().__init__(f"{holder} is applying or reverting in place on {target} (waited {waited:g} s); "
                         "nothing was changed: try again once it has finished")


class NothingToCommit(DeltastoreError, ValueError):
    pass


class IdenticalVersion(NothingToCommit):
    """A commit that would store exactly what the stance's newest version stores."""

    def __init__(self, ref: str, version_id: str):
        self.ref = ref
        self.version_id = version_id
        super().__init__(f"the model is identical to {ref} (same base, encoding and tensors): nothing was "
                         "committed; pass --allow-empty to make a new version anyway")


class NotAFineTune(DeltastoreError, ValueError):
    """A model whose tensors moved too far from the base's to be a fine-tune of it."""

    def __init__(self, median: float, threshold: float, base: str):
        self.median = median
        self.threshold = threshold
        self.base = base
        super().__init__(f"the model does not look like a fine-tune of base {base}: the median relative "
                         f"change ||dW||/||W|| of its tensors is {median:.3g}, above {threshold:g} (a fine-tune's "
                         "is far smaller); check --base, or pass --force to commit it anyway")


class NonFiniteTensor(DeltastoreError, ValueError):
    """A fine-tuned tensor holding nan or inf: most often a fine-tune that diverged."""

    def __init__(self, name: str, count: int, numel: int):
        self.name = name
        self.count = count
        self.numel = numel
        super().__init__(
            f"tensor {name!r} of the fine-tune holds {count} nan or inf values (of {numel}); a diverged "
            "fine-tune? Nothing was stored; to store it as it is, pass --allow-nonfinite "
            "(allow_nonfinite=True), with a lossless encoding for this tensor")


class StanceExists(DeltastoreError, FileExistsError):
    def __init__(self, stance: str, old: str | None = None):
        self.stance = stance
        self.old = old
        # A line to copy: the name rules leave nothing in a name to quote for a shell.
        merge = (f"; `deltastore stance merge {old} {stance}` moves the versions of "
                 f"{cut(old)} into it" if old is not None and len(old) + len(stance) <= 2 * SHOWN else "")
        super().__init__(f"a stance named {cut(stance)} already exists, with its own versions{merge}; "
                         "or choose another name")


class TagsClash(DeltastoreError, FileExistsError):
    """Two stances to merge hold tags of the same name."""

    def __init__(self, old: str, into: str, tags: list[str]):
        self.old, self.into, self.tags = old, into, tags
        super().__init__(f"{cut(old)} and {cut(into)} both have a tag named {', '.join(cut(t) for t in tags[:5])}"
                         f"{' ...' if len(tags) > 5 else ''}; tag one of them under another name and remove "
                         "the old tag, then merge")


class StanceNameClose(DeltastoreError, LookupError):
    """A commit to a new stance whose name is a few edits from an existing one: most often a typo."""

    def __init__(self, stance: str, close: str):
        self.stance = stance
        self.close = close
        super().__init__(f"there is no stance {cut(stance)}, but there is {cut(close)}: commit to {cut(close)}, "
                         f"or pass --new-stance to start a stance named {cut(stance)}")


class TagExists(DeltastoreError, ValueError):
    """A tag that already names another version: tags move only when asked (as git's do)."""

    def __init__(self, stance: str, tag: str, current: str, option: str = "--force"):
        self.stance = stance
        self.tag = tag
        self.current = current
        super().__init__(f"tag {stance}@{tag} already names {current}; pass {option} to move it")


class TagNotFound(DeltastoreError, KeyError):
    def __init__(self, stance: str, tag: str, candidates: list[str] | None = None):
        self.stance = stance
        self.tag = tag
        self.candidates = candidates or []
        known = f"; its tags: {', '.join(self.candidates)}" if self.candidates else "; it has no tags"
        super().__init__(f"stance {cut(stance)} has no tag {cut(tag)}{known}")

    def __str__(self) -> str:
        return self.args[0]


class MetadataError(DeltastoreError, ValueError):
    """Version metadata that cannot be stored: a bad key, or a metadata file that is not a flat
    JSON object of strings, numbers and booleans."""


class VersionConflict(DeltastoreError, FileExistsError):
    """A version made elsewhere whose stance already has its number here as another version."""

    def __init__(self, stance: str, number: int, existing: str | None, incoming: str, where: str = "here"):
        self.stance = stance
        self.number = number
        self.existing = existing  # None: a version deleted here held the number (not given again)
        self.incoming = incoming
        held = (f"is already version {existing[:19]} {where}" if existing is not None else
                f"was another version, deleted {where} (a number is not given again)")
        super().__init__(
            f"{stance}@{number} {held}, not {incoming[:19]}; "
            "the two stores' histories of this stance differ: pull it into another store, or leave "
            "this stance out (--stance)")


class HubError(DeltastoreError):
    """Talking to the Hugging Face Hub failed. Carries the repo and revision it was about."""

    def __init__(self, message: str, *, repo_id: str, revision: str | None = None):
        self.repo_id = repo_id
        self.revision = revision
        super().__init__(message)


class HubRepoNotFound(HubError, FileNotFoundError):
    def __init__(self, repo_id: str, *, endpoint: str, revision: str | None = None, message: str | None = None):
        self.endpoint = endpoint
        super().__init__(
            message or f"no Hub repo {repo_id} at {endpoint} (or it is private and this token cannot see it); "
            "check the id, or pass --token / set HF_TOKEN", repo_id=repo_id, revision=revision)


class HubRevisionNotFound(HubError, LookupError):
    def __init__(self, repo_id: str, revision: str, *, hint: str = "a version's revision is its tag, STANCE-vN"):
        super().__init__(f"Hub repo {repo_id} has no revision {revision!r}; {hint}", repo_id=repo_id,
                         revision=revision)


class HubAccessDenied(HubError, PermissionError):
    def __init__(self, repo_id: str, reason: str, *, revision: str | None = None, status: int | None = None):
        self.status = status
        self.reason = reason
        super().__init__(
            f"no access to Hub repo {repo_id}: {reason}; pass a token with access (--token or HF_TOKEN)",
            repo_id=repo_id, revision=revision)


class HubUnreachable(HubError, ConnectionError):
    def __init__(self, repo_id: str, endpoint: str, reason: str, *, revision: str | None = None):
        self.endpoint = endpoint
        super().__init__(
            f"cannot reach the Hub at {endpoint} ({reason}); check the network, or --endpoint / HF_ENDPOINT",
            repo_id=repo_id, revision=revision)


class HubConflict(HubError, FileExistsError):
    """The repo holds something a push would contradict, or changed while pushing."""


class HubStanceNotFound(HubError, LookupError):
    def __init__(self, repo_id: str, revision: str | None, stance: str, known: list[str]):
        self.stance = stance
        super().__init__(f"Hub repo {repo_id} has no version of stance {cut(stance)} at {revision or 'main'}; "
                         f"it has {', '.join(known) or 'none'}", repo_id=repo_id, revision=revision)


class HubRequestRefused(HubError, ValueError):
    """A request the Hub (or its client) refuses as malformed: a bad repo id, a 400."""


class NotADeltaRepo(HubError, ValueError):
    def __init__(self, repo_id: str, revision: str | None, reason: str):
        super().__init__(f"Hub repo {repo_id}{'@' + revision if revision else ''} is not a deltastore repo "
                         f"({reason}); it must be written by `deltastore push`",
                         repo_id=repo_id, revision=revision)


class PulledDataRejected(HubError, UnsafeInput):
    """Pulled data that breaks a rule: a hash, a size or a name. Nothing was stored."""

    def __init__(self, repo_id: str, revision: str | None, file: str, reason: str):
        self.file = file
        self.reason = reason
        super().__init__(f"refused {file} from Hub repo {repo_id}: {reason}; nothing was stored",
                         repo_id=repo_id, revision=revision)


class PulledBaseMissing(HubError, BaseNotFound):
    """A pulled version is a delta against a base this store does not have."""

    def __init__(self, repo_id: str, revision: str | None, ref: str, base_id: str, hub_id: str | None):
        self.ref = ref
        self.base = base_id
        self.base_id = base_id
        self.hub_id = hub_id
        self.candidates = []
        where = f" (Hub id {hub_id})" if hub_id else " (its Hub id is not recorded)"
        todo = ("pull again with --fetch-base to fetch it from the Hub, or register your copy with "
                "`deltastore base add MODEL` first" if hub_id else
                "register that model first with `deltastore base add MODEL`, then pull again")
        DeltastoreError.__init__(
            self, f"{ref} from {repo_id} is a delta against base {base_id}{where}, which this store "
                  f"does not have; {todo}")
        self.repo_id = repo_id
        self.revision = revision


class PulledBaseChanged(HubError, BaseMismatch):
    """A base fetched from the Hub for a pull is not the base the pulled versions need: the
    base repo's weights at that revision are others. Nothing was stored."""

    def __init__(self, repo_id: str, revision: str | None, ref: str, expected: str, actual: str,
                 hub_id: str, hub_revision: str, recorded: str | None):
        self.ref = ref
        self.hub_id = hub_id
        self.hub_revision = hub_revision
        self.recorded = recorded
        hint = (f"; the repo records commit {recorded}: pull without --base-revision to fetch that one"
                if recorded and recorded != hub_revision else "")
        BaseMismatch.__init__(self, expected, actual, [], message=(
            f"{hub_id} at {hub_revision} is base {short(actual)}, but {ref} from {repo_id} needs base "
            f"{short(expected)}: "
            f"the Hub repo's weights at that revision are not those the stance was made on; nothing was "
            f"stored{hint}"))
        self.repo_id = repo_id
        self.revision = revision


REBUILD_HINT = "run `deltastore fsck --rebuild-catalog` to rebuild it from the store's objects and refs"


class CatalogError(DeltastoreError):
    """The catalog cannot be used: damaged, missing, or SQLite failed on it."""


class CatalogDamaged(CatalogError):
    def __init__(self, root: str, problem: str):
        self.root = root
        self.problem = " ".join(problem.split())  # SQLite's reports span lines; errors are one
        super().__init__(f"the catalog of the store at {root} {self.problem}; {REBUILD_HINT}")


class DiskFull(CatalogError, OSError):
    def __init__(self) -> None:
        super().__init__("No space left on device: free space, then run the command again")

    def __str__(self) -> str:  # OSError would print its args as a tuple
        return self.args[0]


class OldStoreFormat(DeltastoreError):
    def __init__(self, root: str, found: str):
        self.root = root
        self.found = found
        super().__init__(f"the store at {root} is of format {found}; run `deltastore upgrade` to convert it "
                         "in place (crash-safe), then run the command again")


class GcRefused(DeltastoreError):
    """gc found the catalog in disagreement with the store's refs and objects: it deletes nothing."""

    def __init__(self, detail: str):
        super().__init__(f"gc deleted nothing: {detail}; {REBUILD_HINT}, then run gc again")


# What a write that found no room raises (EFBIG: a file-size limit, as a quota gives).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and not isinstance(e, DeltastoreError) and e.errno in NO_SPACE


class LocalStanceDiffers(HubError, FileExistsError):
    """A pulled stance whose name a local stance holds, with versions the repo's stance lacks:
    the user's own work, which a pull never extends unasked."""

    def __init__(self, repo_id: str, revision: str | None, stance: str, local: str, own: list[str]):
        self.stance = stance
        self.local = local
        self.own = own
        shown = ", ".join(own[:3]) + (f" and {len(own) - 3} more" if len(own) > 3 else "")
        super().__init__(f"stance {local} here holds versions that {stance} in Hub repo {repo_id} does not ({shown}); "
                         f"nothing was stored: pull it under another name with --into NAME (or leave it out with "
                         "--stance)", repo_id=repo_id, revision=revision)


class RemoteError(DeltastoreError):
    """Talking to a remote (object storage or a shared folder) failed, or it cannot be used."""

    def __init__(self, message: str, *, url: str):
        self.url = url
        super().__init__(message)


class RemoteNotFound(RemoteError, LookupError):
    def __init__(self, name: str, known: list[str]):
        self.name = name
        hint = f"known remotes: {', '.join(known)}" if known else "add one with `deltastore remote add NAME URL`"
        super().__init__(f"no remote named {name!r} ({hint})", url="")


class RemoteLocked(RemoteError):
    """A live lock of another push or gc on a remote keeps this one out (schema/FORMAT.md §10)."""

    def __init__(self, url: str, kind: str, lock: str, mine: str, stale_after: str):
        self.kind = kind
        self.lock = lock
        holder = {"push": "a push", "gc": "a gc"}.get(kind, "a lock it cannot read")
        super().__init__(f"remote {url} is locked by {holder}: {lock}; a {mine} does not run while it is held: "
                         f"try again once it ends, or remove that file if its process is gone (a lock not "
                         f"refreshed for {stale_after} is stale, and removed then)", url=url)


class RemoteDataRejected(RemoteError, UnsafeInput):
    """Data read from a remote that breaks a rule: a hash, a size or a name. Nothing was stored."""

    def __init__(self, url: str, file: str, reason: str):
        self.file = file
        self.reason = reason
        super().__init__(f"refused {file} from remote {url}: {reason}; nothing was stored", url=url)
