"""The catalog's SQLite connection: the file checked before it is opened, opened read-only or
in WAL mode with a busy timeout (so many processes can read and write one store), one lock
for the threads that share it, and the transactions that keep the catalog and the ref log in
step: a write transaction that fails undoes its append to the log, one interrupted after its
COMMIT keeps it; savepoints and read snapshots. SQLite's failures leave here as
`CatalogError`s (a damaged catalog names the rebuild, a full disk says so), never as sqlite3
exceptions.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..core.errors import CatalogDamaged, CatalogError, DiskFull, ReadOnlyStore
from .reflog import RefLog, tail_id


class IndexConflict(CatalogDamaged):
    """A row the catalog's constraints refuse (two versions under one number, a base name two
    bases hold, a base versions still use): the catalog is sound, and a replay sets aside the
    ref record that brought the row (index.py)."""

    def __init__(self, root: str, detail: str):
        self.detail = detail
        super().__init__(root, f"is unreadable ({detail})")


def _import_sqlite_utils() -> Any:
    """sqlite_utils, without the pandas and numpy it imports when they are installed (1.2 s of
    imports) only to convert their values on insert: the catalog stores plain Python values.
    Where they are imported already, it gets them as usual."""
    blocked = [name for name in ("pandas", "numpy") if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` fail
    try:
        import sqlite_utils
    finally:
        for name in blocked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    return sqlite_utils


SQLITE_MAGIC = b"SQLite format 3\x00"

BUSY_TIMEOUT_S = 60

WAL_HEADER_BYTES = 32


def check_file(path: Path) -> None:
    """The checks that need no SQLite: the file is there, whole, and an SQLite database."""
    root = str(path.parent)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(100)
    except FileNotFoundError:
        raise CatalogDamaged(root, "is missing (catalog.db)") from None
    except OSError as e:
        raise CatalogDamaged(root, f"cannot be read ({e.strerror or e})") from None
    if size == 0:
        raise CatalogDamaged(root, "is empty (catalog.db has 0 bytes)")
    if not head.startswith(SQLITE_MAGIC) or len(head) < 100:
        raise CatalogDamaged(root, "is not an SQLite database")
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(head[28:32], "big")
    # The header's page count is valid when its change counter matches (SQLite file format §1.3.7).
    # A checkpoint killed part way leaves a header counting pages not yet copied out of the
    # write-ahead log: the log still holds them and SQLite replays it on open, so with a log
    # present the file is not judged by its size.
    if head[24:28] == head[92:96] and size < pages * page_size and not _holds_log(path):
        raise CatalogDamaged(root, f"is truncated ({size} bytes, its header says {pages * page_size})")


def _holds_log(path: Path) -> bool:
    try:
        return Path(f"{path}-wal").stat().st_size > WAL_HEADER_BYTES
    except FileNotFoundError:
        return False


def _open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection. In WAL mode even a reader needs the -shm file, which a folder
    this process cannot write to cannot get; there, when no write-ahead log is left to read,
    the database is opened as immutable (nothing can change it while its folder is read-only)."""
    def connect(query: str) -> sqlite3.Connection:
        return sqlite3.connect(f"{path.absolute().as_uri()}?{query}", uri=True, timeout=BUSY_TIMEOUT_S,
                               isolation_level=None, check_same_thread=False)

    conn = connect("mode=ro")
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
        if os.access(path.parent, os.W_OK):
            raise
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise ReadOnlyStore(str(path.parent), detail="its catalog has a write-ahead log that was never "
                            "checkpointed, which a read-only folder cannot replay; open the store once "
                            "with write access")
    return connect("mode=ro&immutable=1")


def _open_writable(path: Path) -> sqlite3.Connection:
    # Autocommit mode: transactions are explicit (`transaction()`), so none is ever left open
    # by accident between statements.
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode survives any process crash; a power cut may roll back the last
    # transactions, which leaves the ref log ahead (replayed on the next open).
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class CatalogConnection:
    """The connection to `path` (`readonly`, or in WAL mode), `refs` the ref log its writes
    append to, and `replay(catalog)`, called inside a write transaction whenever the log holds
    records the catalog lacks (a writer died between its append and its commit)."""

    def __init__(self, path: Path, *, readonly: bool = False, refs: RefLog | None = None, replay: Any = None):
        self.path = Path(path)
        self.root = self.path.parent
        self.readonly = readonly
        self.refs = refs
        self.replay = replay
        self._log_undo: int | None = None  # where the log was before this transaction appended
        self._open = False  # inside transaction() or snapshot()
        try:
            conn = _open_readonly(self.path) if readonly else _open_writable(self.path)
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as e:
            raise translated(e, self.root) from None
        self.conn = conn
        self._lock = threading.RLock()

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front so that two writers never deadlock. The lock
        serialises threads of this process that share the connection (a commit's workers). If
        it fails after appending to the ref log, the append is undone before the lock goes."""
        with self._lock:
            outer = self._log_undo
            self._begin("BEGIN IMMEDIATE")
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException as e:
                if outer is None and self._landed():
                    raise  # a Ctrl-C after COMMIT: the log's records are the catalog's now
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # SQLite rolled back already (a full disk, an I/O error)
                if self._log_undo is not None and outer is None:
                    self.refs.truncate(self._log_undo)
                if isinstance(e, (sqlite3.Error, UnicodeDecodeError)):
                    raise translated(e, self.root) from None
                raise
            finally:
                self._open = False
                self._log_undo = outer

    def _landed(self) -> bool:
        """Whether this transaction's COMMIT went through before what interrupted it (a
        KeyboardInterrupt between COMMIT and the end of the block). The catalog then indexes
        the records this transaction appended to the ref log: undoing the append would leave a
        catalog ahead of the log, and the record lost. Read from the catalog itself, since the
        interruption may come before any flag could be set."""
        if self._log_undo is None or self.conn.in_transaction:
            return False
        try:
            return self.log_position()[0] > self._log_undo
        except sqlite3.Error:
            return False

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Inside `transaction()`: what the block writes lands whole or, when it raises, not at
        all, while the transaction goes on (a replay setting one ref record aside)."""
        try:
            self.conn.execute("SAVEPOINT record")
        except sqlite3.Error as e:
            raise translated(e, self.root) from None
        try:
            yield
        except BaseException:
            try:
                self.conn.execute("ROLLBACK TO record")
                self.conn.execute("RELEASE record")
            except sqlite3.Error:
                pass  # SQLite rolled the transaction back already; the outer one fails
            raise
        try:
            self.conn.execute("RELEASE record")
        except sqlite3.Error as e:
            raise translated(e, self.root) from None

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """One read transaction: every query inside sees the same state of the catalog. Under
        the lock, like a write: threads share the connection, and so its transaction."""
        with self._lock:
            self._begin("BEGIN")
            try:
                yield
            except (sqlite3.Error, UnicodeDecodeError) as e:
                raise translated(e, self.root) from None
            finally:
                self._open = False
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass

    def _begin(self, statement: str) -> None:
        """Under the lock: start this catalog's transaction. A rollback refused earlier (another
        thread's statement was still running) can have left one open, which goes first: nothing
        of it committed. A transaction of this catalog's own still open is a nesting, which
        SQLite refuses."""
        try:
            if self.conn.in_transaction and not self._open:
                self.conn.execute("ROLLBACK")
            self.conn.execute(statement)
        except sqlite3.Error as e:
            raise translated(e, self.root) from None
        self._open = True

    # -- what the catalog has indexed of the ref log --------------------------------------------

    def state(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM state").fetchall())

    def set_state(self, values: dict[str, str]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", list(values.items()))

    def log_position(self) -> tuple[int, str]:
        s = self.state()
        return int(s.get("log_offset", "0")), s.get("log_tail", "")

    def set_log_position(self, offset: int, line: bytes) -> None:
        """Inside `transaction()`: the catalog now holds every record up to `offset`."""
        self.set_state({"log_offset": str(offset), "log_tail": tail_id(line) if line else ""})

    def catch_up(self) -> None:
        """Replay the records of the log the catalog lacks, under the write lock (idempotent)."""
        with self.transaction():
            if self.log_position()[0] < self.refs.whole_size():
                self.replay(self)

    def record(self, *records: dict) -> None:
        """Inside `transaction()`: append ref records to the log (one write, fsynced) and note
        that the catalog holds them. The caller updates the rows in the same transaction."""
        if self.refs is None:
            return
        if self.log_position()[0] != self.refs.whole_size() and self.replay is not None:
            self.replay(self)
        before, after, last = self.refs.append(list(records))
        if self._log_undo is None:
            self._log_undo = before
        self.set_log_position(after, last)

    # -- the database itself ---------------------------------------------------------------------

    def schema(self) -> str:
        rows = self.conn.execute(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' "
            "ORDER BY type DESC, name")
        return ";\n".join(r[0] for r in rows) + ";\n"

    def quick_check(self) -> list[str]:
        """SQLite's own check of the database's structure: [] when sound."""
        rows = [r[0] for r in self.conn.execute("PRAGMA quick_check")]
        return [] if rows == ["ok"] else rows

    def checkpoint(self) -> None:
        """Move what the write-ahead log holds into the database file and empty the log (a
        rebuilt catalog, before it is renamed into place without its -wal)."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def query(self, sql: str, params: Any = ()) -> list[dict]:
        cursor = self.conn.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor]

    def one(self, sql: str, params: Any = ()) -> dict | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    @functools.cached_property
    def db(self) -> Any:
        """The connection as sqlite-utils sees it, for the catalog's writes. Made on the first
        write: importing sqlite-utils (and the scan of installed packages' entry points its
        plugins make) was a third of the start of a command that only reads, and reads are
        plain SELECTs on the same connection."""
        return _import_sqlite_utils().Database(self.conn)

    def insert(self, table: str, rows: list[dict], *, replace: bool = False) -> int | None:
        """Inside `transaction()`: rows of one table (a dict or list value is stored as its JSON
        text, as sqlite-utils does). Returns the row's key when there is one row."""
        if not rows:
            return None
        if len(rows) == 1:
            return self.db[table].insert(rows[0], replace=replace).last_rowid
        self.db[table].insert_all(rows, replace=replace, batch_size=500)
        return None


# I/O errors of a write: what a file-size limit (EFBIG) or a quota gives where a full disk
# gives SQLITE_FULL; the user's remedy is the same.
_WRITE_FAILED = {sqlite3.SQLITE_IOERR_WRITE, sqlite3.SQLITE_IOERR_FSYNC, sqlite3.SQLITE_IOERR_TRUNCATE,
                 sqlite3.SQLITE_IOERR_SHMSIZE}


def translated(e: BaseException, root: Path) -> Exception:
    """A CatalogError for what SQLite (or the text it holds) raised."""
    if isinstance(e, UnicodeDecodeError):
        return CatalogDamaged(str(root), "holds text that is not UTF-8 (it was damaged)")
    if isinstance(e, sqlite3.IntegrityError):
        return IndexConflict(str(root), str(e))
    extended = getattr(e, "sqlite_errorcode", None)
    code = extended & 0xFF if extended is not None else None  # the primary code of an extended one
    if code == sqlite3.SQLITE_FULL or "database or disk is full" in str(e) or extended in _WRITE_FAILED:
        return DiskFull()
    if code == sqlite3.SQLITE_BUSY or "database is locked" in str(e):
        return CatalogError(f"the catalog of the store at {root} stayed locked by another process for "
                            f"{BUSY_TIMEOUT_S} s; run the command again when it is done")
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return CatalogError(f"cannot write to the catalog of the store at {root} ({e}); check the folder's "
                            "permissions and free space")
    # Anything else, an I/O error included (what a write-ahead log removed under a reader
    # gives), means the catalog cannot be trusted.
    return CatalogDamaged(str(root), f"is unreadable ({e})")


def _translating(method: Any) -> Any:
    @functools.wraps(method)
    def wrapper(self: CatalogConnection, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.Error, UnicodeDecodeError) as e:
            raise translated(e, self.root) from None
    return wrapper


def speaking_catalog_errors(cls: type) -> type:
    """Every public query of `cls` speaks CatalogError, never sqlite3 (the context managers
    translate their own): the decorator of each class of the catalog."""
    for name, value in list(vars(cls).items()):
        if callable(value) and not name.startswith("__") and name not in ("transaction", "snapshot", "savepoint"):
            setattr(cls, name, _translating(value))
    return cls


speaking_catalog_errors(CatalogConnection)
