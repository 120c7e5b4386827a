"""Remotes: a store's objects and refs on another filesystem, reached through fsspec (a shared
folder, S3, GCS, Azure), with `push`, `pull` and `clone` (schema/FORMAT.md §10). This module is
their one import for callers (the CLI, the library's users): each name here is defined in the
module that owns it.

No server: many pushers share one remote, each taking a version's number there with a
conditional write, under a shared lock that keeps gc off meanwhile (remotepush.py). A remote is
untrusted when read: everything is checked before the store takes anything (remotepull.py). A
remote is a name and a URL, never credentials (remotenames.py); its files and their layout are
remotefs.py's, a backend's failures remoteerrors.py's.
"""

from __future__ import annotations

from .remoteerrors import backend_errors
from .remotefs import (MARKER, MAX_REF_BYTES, REMOTE_FORMAT, TRANSFERS, Progress, Remote, RemoteTag, RemoteVersion,
                       remote_manifest)
from .remotenames import (CONFIG_FILE, LOCAL_SCHEMES, NOT_PERSISTENT, REMOTE_NAME, Remotes, add_remote, check_url,
                          remote_url, remotes, remove_remote)
from .remotepull import MAX_BASE_RECORD_BYTES, PullResult, clone, pull
from .remotepush import PushResult, push

__all__ = ["CONFIG_FILE", "LOCAL_SCHEMES", "MARKER", "MAX_BASE_RECORD_BYTES", "MAX_REF_BYTES", "NOT_PERSISTENT",
           "REMOTE_FORMAT", "REMOTE_NAME", "TRANSFERS", "Progress", "PullResult", "PushResult", "Remote", "RemoteTag",
           "RemoteVersion", "Remotes", "add_remote", "backend_errors", "check_url", "clone", "pull", "push",
           "remote_manifest", "remote_url", "remotes", "remove_remote"]
