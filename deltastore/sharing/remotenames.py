"""A store's remotes by name: each a name and a URL in `remotes.json`, never credentials; the
URLs a remote can be kept and opened under (a folder's made absolute, those that would keep
nothing refused)."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..core.errors import DeltastoreError, RemoteNotFound, UnsafeInput
from ..core.limits import load_json

if TYPE_CHECKING:
    from ..store import Store

CONFIG_FILE = "remotes.json"
REMOTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Backends that keep nothing once the command exits, or that are wrappers and inline data with no
# storage of their own: a push there would say "pushed" and keep nothing.
NOT_PERSISTENT = frozenset({"memory", "data", "cached", "blockcache", "filecache", "simplecache", "dir", "generic",
                            "reference", "async_wrapper", "asyncwrapper"})
LOCAL_SCHEMES = ("file", "local")


def check_url(url: str) -> str:
    """The URL a remote is kept and opened under: a folder's (file://) made absolute, so that it
    names the same folder from any working folder; refused when it cannot hold a remote."""
    parts = urlsplit(url)
    if parts.scheme in LOCAL_SCHEMES:
        return _folder_url(url, parts)
    if not parts.scheme or not parts.netloc:
        raise UnsafeInput(f"remote URL {url[:120]!r} needs a scheme and a location, as in s3://bucket/prefix "
                          "or file:///shared/folder")
    if "@" in parts.netloc or parts.password:
        raise UnsafeInput("a remote URL must not hold a user or password: credentials come from each "
                          "backend's usual places (AWS variables or profiles, gcloud, Azure), never from the store")
    if parts.scheme in NOT_PERSISTENT:
        raise UnsafeInput(f"remote URL {url[:120]!r}: {parts.scheme}:// keeps nothing once the command exits, "
                          "so it cannot hold a remote: use a folder (file:///PATH) or object storage "
                          "(s3://, gs://, az://)")
    return url


def _folder_url(url: str, parts: Any) -> str:
    """file:///PATH, file://localhost/PATH and file:PATH (relative to the working folder) as
    file:///ABSOLUTE/PATH. Another host is refused: fsspec would read it as a relative folder
    named after the host."""
    if parts.netloc.lower() not in ("", "localhost"):
        raise UnsafeInput(f"remote URL {url[:120]!r} names the host {parts.netloc[:60]!r}: a folder remote is "
                          "file:///ABSOLUTE/PATH (or file://localhost/PATH) on this machine; mount a network share "
                          "and give the folder it is mounted at")
    if parts.query or parts.fragment or not parts.path:
        raise UnsafeInput(f"remote URL {url[:120]!r} is not a folder: write file:///ABSOLUTE/PATH")
    return "file://" + os.path.abspath(parts.path)


def _root(store: Store | str | os.PathLike) -> Path:
    """A store's folder, from the store or the folder itself (as callers before the API's one
    rule passed it)."""
    return Path(store) if isinstance(store, (str, os.PathLike)) else store.root


class Remotes(dict[str, str]):
    """A store's remotes, name -> URL, in name order."""

    def to_json(self) -> list[dict[str, str]]:
        """`remote list --json`."""
        return [{"name": name, "url": url} for name, url in self.items()]


def remotes(store: Store | str | os.PathLike) -> Remotes:
    """The store's remotes: name -> URL. `store`: a Store, or its folder."""
    path = _root(store) / CONFIG_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Remotes()
    config = load_json(raw, str(path), max_bytes=1 << 20)
    if not isinstance(config, dict) or not all(isinstance(v, dict) and isinstance(v.get("url"), str)
                                               for v in config.values()):
        raise DeltastoreError(f"{path} is not a list of remotes; fix or remove it")
    return Remotes((name, v["url"]) for name, v in sorted(config.items()))


def add_remote(store: Store | str | os.PathLike, name: str, url: str) -> str:
    """Remember `url` as remote `name`; returns the URL as kept (a folder's made absolute)."""
    if not REMOTE_NAME.match(name):
        raise UnsafeInput(f"remote name {name[:80]!r} is not allowed: use letters, digits, '.', '_' and '-'")
    url = check_url(url)
    config = remotes(store)
    if name in config:
        raise UnsafeInput(f"remote {name!r} exists already ({config[name]}); remove it first")
    config[name] = url
    _write_config(_root(store), config)
    return url


def remove_remote(store: Store | str | os.PathLike, name: str) -> str:
    config = remotes(store)
    if name not in config:
        raise RemoteNotFound(name, sorted(config))
    url = config.pop(name)
    _write_config(_root(store), config)
    return url


def remote_url(store: Store | str | os.PathLike, name_or_url: str) -> str:
    """A remote's URL from its name, or the URL given, checked (check_url)."""
    if ":" in name_or_url:  # a URL: a remote's name holds no ':'
        return check_url(name_or_url)
    config = remotes(store)
    if name_or_url not in config:
        raise RemoteNotFound(name_or_url, sorted(config))
    # One added before URLs were checked as they are now is checked (and made absolute) here.
    return check_url(config[name_or_url])


def _write_config(root: Path, config: dict[str, str]) -> None:
    tmp = root / "tmp" / f"{os.getpid()}-{uuid.uuid4().hex}-remotes.json"
    tmp.write_bytes(json.dumps({k: {"url": v} for k, v in config.items()}, indent=1, sort_keys=True).encode() + b"\n")
    os.replace(tmp, root / CONFIG_FILE)

