"""The edit ledger: a persistent, crash-safe history of the edits applied to a model (SQLite, WAL).

Every edit is one row: id, times, the model's fingerprint, method and hyperparameters, the request(s),
metrics measured when it was applied (P(target) and the greedy answer before and after), its state, and
its patch, a safetensors file next to the database (``<db>.patches/<id>.safetensors``) whose SHA-256 is
in the row and checked on every load.

The database is the source of truth and the weights are derived from it: the weights of a model are
always ``base + the applied patches in ledger order`` (``Patch.apply`` / ``Patch.revert``, which re-derive
from stored base values: reverting any edit, not only the last, leaves no floating-point drift), so a
fresh process replaying the same database onto the same base model reaches the same weights bit for bit.

Crash safety (a process killed at any instant, SIGKILL included):

- an edit first takes an advisory lock (``flock``) on ``<db>.locks/<id>.lock``, which the kernel releases
  when its process ends, however it ends; then it records its intent (state ``pending``) in one
  transaction, computes the patch, writes the patch file (atomic rename, fsync), and flips the row to
  ``applied`` in a second transaction; a pending row whose lock nobody holds is marked ``aborted`` the next
  time the database is opened, and its partial files are removed: an edit is either applied with a
  complete, hash-checked patch, or not applied at all. (Not PIDs: in a container the next run is PID 1
  again, and a reused PID looks alive forever.);
- a revert is one transaction (state ``reverted``); the weights follow from the database;
- applying the database to a model (``sync``) is idempotent: on restart it simply replays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX (Windows): pending edits are then told alive by their PID
    fcntl = None  # type: ignore[assignment]

import torch
from torch import nn

from .models import fingerprint
from .patch import Patch, PatchError, applied_patches, revert_all
from .requests import EditRequest, EditRequestError, check_for_model

SCHEMA_VERSION = 2  # 2: events carry who asked (actor, client); idempotency keys of the service
EXPORT_FORMAT = "modeledit-ledger"
STATES = ("pending", "applied", "reverted", "aborted")
MARKER = ("application", "modeledit-ledger")  # the meta row that says "this file is a ledger"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS edits (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,  -- order of application
    id           TEXT NOT NULL UNIQUE,               -- also the patch's id
    state        TEXT NOT NULL CHECK (state IN ('pending', 'applied', 'reverted', 'aborted')),
    created_at   TEXT NOT NULL,
    applied_at   TEXT,
    reverted_at  TEXT,
    fingerprint  TEXT NOT NULL,                      -- the base model the patch belongs to
    method       TEXT NOT NULL,
    hparams      TEXT NOT NULL,                      -- JSON
    requests     TEXT NOT NULL,                      -- JSON list of EditRequest fields
    metrics      TEXT,                               -- JSON, measured at apply time
    patch_file   TEXT,                               -- relative to the patches folder
    patch_sha256 TEXT,
    patch_bytes  INTEGER,
    owner_pid    INTEGER,                            -- the process computing a pending edit
    error        TEXT                                -- why an edit was aborted
);
CREATE TABLE IF NOT EXISTS events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    time    TEXT NOT NULL,
    edit_id TEXT NOT NULL,
    action  TEXT NOT NULL,
    detail  TEXT,
    actor   TEXT,                                    -- who asked: a token's fingerprint, cli:<user>
    client  TEXT                                     -- from where: the client's address
);
"""
# Schema 2 (added to schema-1 ledgers when they are opened for writing).
_IDEMPOTENCY_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key            TEXT PRIMARY KEY,                 -- the client's Idempotency-Key
    request_sha256 TEXT NOT NULL,                    -- of the request it came with
    edit_id        TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    status         INTEGER,                          -- the first response, once it was sent
    response       TEXT                              -- JSON
)
"""
_EVENT_COLUMNS = ("actor", "client")


class LedgerError(ValueError):
    """The ledger cannot do what was asked (unknown id, wrong model, corrupt patch file, ...)."""


class UnknownEditError(LedgerError):
    """No edit has this id."""


class EditStateError(LedgerError):
    """The edit is not in a state that allows this (e.g. reverting an edit that is not applied)."""


class IdempotencyKeyError(LedgerError):
    """An idempotency key that another edit recorded already."""


@dataclass(frozen=True)
class Audit:
    """Who asked for a change and from where, recorded with its events. Never a secret: ``actor`` is e.g.
    ``token:<fingerprint>`` (``server.token_fingerprint``) or ``cli:<user>``; ``client`` an address."""

    actor: str | None = None
    client: str | None = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_recorded(path: Path, e: Entry, where: str, what: str, recorder: str) -> Patch:
    """The patch in ``path`` if its SHA-256, id and fingerprint are those recorded for ``e`` (by the ledger or
    an export's manifest: ``recorder``); else a LedgerError that starts with ``where`` and names ``what``."""
    digest = _sha256(path)
    if digest != e.patch_sha256:
        raise LedgerError(
            f"{where}{what} is corrupt (SHA-256 {digest[:12]}..., {recorder} {e.patch_sha256[:12]}...)"
        )
    try:
        patch = Patch.load(path)
    except PatchError as err:
        raise LedgerError(f"{where}edit {e.id}: {err}") from None
    if patch.id != e.id or patch.fingerprint != e.fingerprint:
        raise LedgerError(
            f"{where}{what} belongs to another edit or model (patch {patch.id} for model {patch.fingerprint})"
        )
    return patch


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock_held(path: Path) -> bool:
    """Whether some open file (of any process, this one included) holds the advisory lock on ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock if this call took it
    return False


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def weights_digest(model: nn.Module) -> str:
    """BLAKE2 hash of every weight's bytes as they are now (unlike ``fingerprint``, never cached)."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _ledger_tables(uri: str) -> bool | None:
    """None if the SQLite database at ``uri`` has no tables, True if it is a modeledit ledger, else False."""
    db = sqlite3.connect(uri, uri=True, timeout=30)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return None
        if not {"meta", "edits", "events"} <= tables:
            return False
        keys = {r[0] for r in db.execute("SELECT key FROM meta")}
        return MARKER[0] in keys or "schema_version" in keys  # the marker, or a ledger made before it
    finally:
        db.close()


@dataclass
class Entry:
    """One row of the ledger. ``patch`` is the Patch object when it is at hand (not serialised)."""

    id: str
    seq: int
    state: str
    created_at: str
    fingerprint: str
    method: str
    hparams: dict[str, Any]
    requests: list[dict]
    metrics: dict[str, Any] | None = None
    applied_at: str | None = None
    reverted_at: str | None = None
    patch_file: str | None = None
    patch_sha256: str | None = None
    patch_bytes: int | None = None
    error: str | None = None
    patch: Patch | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "patch"}

    def summary(self) -> str:
        """``prompt -> target`` of the first request (and how many more)."""
        if not self.requests:
            return ""
        r = self.requests[0]
        prompt = str(r.get("prompt", ""))
        text = prompt.replace("{}", str(r.get("subject") or "")) if "{}" in prompt else prompt
        more = f" (+{len(self.requests) - 1} more)" if len(self.requests) > 1 else ""
        return f"{text} -> {r.get('target_new')}{more}"


_COLUMNS = (
    "id seq state created_at fingerprint method hparams requests metrics applied_at reverted_at "
    "patch_file patch_sha256 patch_bytes error"
).split()
_JSON_COLUMNS = {"hparams", "requests", "metrics"}


def _entry(row: sqlite3.Row) -> Entry:
    values = {k: row[k] for k in _COLUMNS}
    for k in _JSON_COLUMNS:
        if values[k] is not None:
            values[k] = json.loads(values[k])
    return Entry(**values)


ID_PATTERN = re.compile(r"[0-9a-f]{12}")  # the ids ``Ledger.edit`` makes (uuid4().hex[:12])
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "created_at": (str,),
    "applied_at": (str, type(None)),
    "reverted_at": (str, type(None)),
    "fingerprint": (str,),
    "method": (str,),
    "hparams": (dict,),
    "requests": (list,),
    "metrics": (dict, type(None)),
    "patch_bytes": (int, type(None)),
}


def _manifest_entry(manifest_path: Path, i: int, item: Any) -> Entry:
    """Entry ``i`` of an export's manifest, checked as untrusted input (its id and file name become paths)."""
    if not isinstance(item, dict):
        raise LedgerError(f"{manifest_path}: entry {i} is not a JSON object")
    missing = [
        k
        for k in ("id", "state", "patch_file", "patch_sha256", "fingerprint", "created_at", "method")
        if not item.get(k)
    ]
    if missing:
        raise LedgerError(f"{manifest_path}: entry {i} is incomplete (no {', '.join(missing)})")
    edit_id = item["id"]
    if not isinstance(edit_id, str) or not ID_PATTERN.fullmatch(edit_id):
        raise LedgerError(f"{manifest_path}: entry {i} has an invalid id {edit_id!r} (ids are 12 hex digits)")
    if item["patch_file"] != f"{edit_id}.safetensors":
        raise LedgerError(
            f"{manifest_path}: entry {i} has an invalid patch_file {item['patch_file']!r} "
            f"(expected '{edit_id}.safetensors')"
        )
    if not isinstance(item["patch_sha256"], str) or not SHA256_PATTERN.fullmatch(item["patch_sha256"]):
        raise LedgerError(f"{manifest_path}: entry {i} has an invalid patch_sha256")
    if item["state"] not in ("applied", "reverted"):
        raise LedgerError(f"{manifest_path}: entry {edit_id} has state {item['state']!r}")
    values = {k: item[k] for k in _COLUMNS if k in item}
    values.setdefault("hparams", {})
    values.setdefault("requests", [])
    values.setdefault("seq", 0)
    for key, types in _MANIFEST_TYPES.items():
        if key in values and (not isinstance(values[key], types) or isinstance(values[key], bool)):
            raise LedgerError(f"{manifest_path}: entry {edit_id} has an invalid {key} {values[key]!r}")
    return Entry(**values)


@torch.no_grad()
def measure(
    model: nn.Module, tokenizer, requests: Sequence[EditRequest], answer_tokens: int = 8
) -> list[dict]:
    """P(target_new) (and P(target_true) where given) after each request's prompt, and its greedy answer
    (each prompt in its form; a question or chat answer is at least ``forms.CHAT_ANSWER_TOKENS`` long)."""
    from .forms import CHAT_ANSWER_TOKENS, prompt_form, rendered
    from .lm import generate
    from .metrics import score_pairs

    shown = [rendered(r, tokenizer) for r in requests]
    prompts, targets, keys = [], [], []
    for i, r in enumerate(shown):
        for key, target in (("p_new", r.target_new), ("p_true", r.target_true)):
            if target:
                prompts.append(r.text)
                targets.append(target)
                keys.append((i, key))
    out: list[dict] = [{} for _ in requests]
    for (i, key), s in zip(keys, score_pairs(model, tokenizer, prompts, targets)):
        out[i][key] = float(torch.tensor(-s.nll).exp())
    if answer_tokens > 0:
        for i, (r, seen) in enumerate(zip(requests, shown)):
            cloze = prompt_form(r.text, r.chat) == "cloze"
            tokens = answer_tokens if cloze else max(answer_tokens, CHAT_ANSWER_TOKENS)
            out[i]["answer"] = generate(model, tokenizer, [seen.text], max_new_tokens=tokens)[0]
    return out


def _as_requests(requests) -> list[EditRequest]:
    if isinstance(requests, (EditRequest, dict)):
        requests = [requests]
    out = []
    for i, r in enumerate(requests):
        if isinstance(r, dict):
            try:
                r = EditRequest(**r)
            except TypeError as e:
                raise EditRequestError(f"request {i}: {e}") from None
        out.append(r)
    if not out:
        raise EditRequestError("no edit requests given")
    return out


class Ledger:
    """A ledger database. Thread-safe (one connection behind a lock); several processes may share a file.

    >>> ledger = Ledger("edits.db")
    >>> ledger.sync(model)                         # replay: weights = base + applied patches, in order
    >>> entry = ledger.edit(model, tokenizer, EditRequest(...), method="ft-l")
    >>> ledger.revert(entry.id, model)             # any entry, not only the last
    """

    def __init__(self, path: str | Path, read_only: bool = False):
        """Open (or create) a ledger. A file that is not a modeledit ledger is refused and never modified;
        ``read_only`` opens an existing ledger for reading only (``mode=ro``: no recovery, no writes)."""
        self.path = Path(path)
        self.patch_dir = self.path.with_name(self.path.name + ".patches")
        self.lock_dir = self.path.with_name(self.path.name + ".locks")  # one lock file per pending edit
        self.read_only = read_only
        if self.path.is_dir():
            raise LedgerError(f"{self.path} is a directory; give the ledger's database file")
        self._lock = threading.RLock()
        self._patches: dict[str, Patch] = {}
        if read_only:
            self._db = self._connect_read_only()
        else:
            new = self._probe()  # before anything writes: another application's file stays untouched
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                # Autocommit mode: every write below is an explicit BEGIN IMMEDIATE ... COMMIT transaction.
                self._db = sqlite3.connect(
                    self.path, timeout=30, isolation_level=None, check_same_thread=False
                )
                self._db.row_factory = sqlite3.Row
                if new:  # the schema first, then WAL: a crash in between leaves a file that reads as new
                    self._create_schema()
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                # ledgers made before the marker existed get it (they were recognised by their tables)
                with self._tx() as db:
                    db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", MARKER)
            except sqlite3.OperationalError as e:  # e.g. a read-only file or folder: not the file's fault
                raise LedgerError(f"cannot open the ledger {self.path} for writing ({e})") from None
            except sqlite3.DatabaseError as e:
                raise LedgerError(f"{self.path} is not a modeledit ledger database ({e})") from None
        version = int(self._meta("schema_version") or 0)
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"{self.path} has ledger schema {version}; this modeledit reads up to {SCHEMA_VERSION}"
            )
        if not read_only:
            self._migrate()
            self.patch_dir.mkdir(exist_ok=True)
            self.recover()

    def _probe(self) -> bool:
        """True if the file is new (absent, empty, or an SQLite database without tables); raise
        ``LedgerError`` unless it is a modeledit ledger. Only reads, and leaves no -wal/-shm files behind
        beside another application's database where none were."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return True
        uri = self.path.resolve().as_uri()
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            # immutable: no locks, no -shm file; it misses a -wal file's content, read with mode=ro then
            found = _ledger_tables(uri + "?mode=ro&immutable=1")
            if found is None and wal.exists() and wal.stat().st_size > 0:
                found = _ledger_tables(uri + "?mode=ro")
        except sqlite3.DatabaseError:
            try:  # a file being written meanwhile can look torn without locks: read it properly
                found = _ledger_tables(uri + "?mode=ro")
            except sqlite3.DatabaseError as e:
                raise LedgerError(f"{self.path} is not a modeledit ledger database ({e})") from None
        if found is None:
            return True
        if found:
            return False
        raise LedgerError(
            f"{self.path} is an SQLite database of another application (no modeledit ledger tables); "
            "left unchanged: give a new file for the ledger"
        )

    def _connect_read_only(self) -> sqlite3.Connection:
        """A ``mode=ro`` connection to an existing ledger (also one in a folder this process cannot write)."""
        if not self.path.is_file():
            raise LedgerError(f"no ledger database at {self.path}")
        if self._probe():
            raise LedgerError(f"{self.path} is not a modeledit ledger database (it holds no ledger yet)")
        uri = self.path.resolve().as_uri() + "?mode=ro"
        try:
            db = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("SELECT count(*) FROM meta").fetchone()
        except sqlite3.OperationalError:
            # A WAL database needs its -shm file; where the folder is read-only nobody can be writing, so
            # the file may be read as immutable.
            db = sqlite3.connect(
                uri + "&immutable=1", uri=True, timeout=30, isolation_level=None, check_same_thread=False
            )
        db.row_factory = sqlite3.Row
        return db

    def _create_schema(self) -> None:
        with self._tx() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(_IDEMPOTENCY_SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('changes', '0')")
            db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", MARKER)

    def _migrate(self) -> None:
        """Bring an older ledger to this schema (opened for writing; every step is idempotent)."""
        if int(self._meta("schema_version") or 0) >= SCHEMA_VERSION:
            return
        with self._tx() as db:
            have = {r["name"] for r in db.execute("PRAGMA table_info(events)")}
            for column in _EVENT_COLUMNS:
                if column not in have:
                    db.execute(f"ALTER TABLE events ADD COLUMN {column} TEXT")
            db.execute(_IDEMPOTENCY_SCHEMA)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # -- low level -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is committed, or (on any error or a kill) none of it."""
        if self.read_only:
            raise LedgerError(f"the ledger {self.path} was opened read-only")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def _log(
        self,
        db: sqlite3.Connection,
        edit_id: str,
        action: str,
        detail: str | None = None,
        audit: Audit | None = None,
    ) -> None:
        """Inside a write transaction: an event row, and the change counter other processes watch."""
        audit = audit or Audit()
        db.execute(
            "INSERT INTO events (time, edit_id, action, detail, actor, client) VALUES (?, ?, ?, ?, ?, ?)",
            (_now(), edit_id, action, detail, audit.actor, audit.client),
        )
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'changes'")

    def _file(self, name: str) -> Path:
        return self.patch_dir / name

    def _write_patch(self, patch: Patch) -> tuple[str, str, int]:
        """Write a patch file durably; (file name, sha256, size)."""
        name = f"{patch.id}.safetensors"
        path = patch.save(self._file(name))  # written to a .partial file, then renamed
        _fsync(path)
        with contextlib.suppress(OSError):  # make the rename durable too (not possible on every OS)
            _fsync(self.patch_dir)
        return name, _sha256(path), path.stat().st_size

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------------------
    def version(self) -> int:
        """A counter bumped by every change, by any process: cheap to poll."""
        return int(self._meta("changes") or 0)

    def entries(self, state: str | None = None) -> list[Entry]:
        """All entries (or those in ``state``), in the order they were applied."""
        if state is not None and state not in STATES:
            raise LedgerError(f"unknown state {state!r}; one of {', '.join(STATES)}")
        if state is None:
            rows = self._query("SELECT * FROM edits ORDER BY seq")
        else:
            rows = self._query("SELECT * FROM edits WHERE state = ? ORDER BY seq", (state,))
        return [_entry(r) for r in rows]

    def get(self, edit_id: str) -> Entry:
        """The entry with this id, or with this unique id prefix."""
        rows = self._query("SELECT * FROM edits WHERE id = ?", (edit_id,))
        if not rows and edit_id and all(c in "0123456789abcdef" for c in edit_id):
            rows = self._query("SELECT * FROM edits WHERE id LIKE ? ORDER BY seq", (edit_id + "%",))
            if len(rows) > 1:
                raise LedgerError(f"edit id prefix {edit_id!r} is ambiguous ({len(rows)} edits match)")
        if not rows:
            raise UnknownEditError(f"no edit {edit_id!r} in {self.path}")
        return _entry(rows[0])

    def events(self, edit_id: str | None = None) -> list[dict]:
        if edit_id is None:
            rows = self._query("SELECT * FROM events ORDER BY seq")
        else:
            rows = self._query("SELECT * FROM events WHERE edit_id = ? ORDER BY seq", (edit_id,))
        return [dict(r) for r in rows]

    def patch(self, edit_id: str) -> Patch:
        """The entry's patch, loaded from its file after checking the file's SHA-256 (cached)."""
        entry = self.get(edit_id)
        cached = self._patches.get(entry.id)
        if cached is not None:
            return cached
        if not entry.patch_file:
            raise LedgerError(f"edit {entry.id} ({entry.state}) has no patch")
        path = self._file(entry.patch_file)
        if not path.exists():
            raise LedgerError(f"edit {entry.id}: its patch file {path} is missing")
        patch = _load_recorded(path, entry, "", f"edit {entry.id}: patch file {path}", "the ledger recorded")
        self._patches[entry.id] = patch
        return patch

    def verify(self) -> list[str]:
        """Problems found (an empty list means consistent): files, hashes, states, leftovers."""
        problems = []
        known = set()
        for e in self.entries():
            if e.patch_file:
                known.add(e.patch_file)
            if e.state in ("applied", "reverted"):
                try:
                    self._patches.pop(e.id, None)
                    self.patch(e.id)
                except LedgerError as err:
                    problems.append(str(err))
            elif e.state == "pending":
                problems.append(f"edit {e.id} is pending (being computed by process {self._owner(e.id)})")
        for path in self.patch_dir.iterdir() if self.patch_dir.is_dir() else ():
            if path.name not in known:
                problems.append(f"{path} belongs to no edit")
        return problems

    def _live(self, edit_id: str, pid: int | None) -> bool:
        """Whether the process computing this pending edit is still running: it holds the edit's lock."""
        if fcntl is None:
            return _pid_alive(pid)
        return _lock_held(self.lock_dir / f"{edit_id}.lock")

    def _hold(self, edit_id: str) -> int | None:
        """Lock the edit's lock file for as long as this process computes it; the file descriptor."""
        if fcntl is None:
            return None
        self.lock_dir.mkdir(exist_ok=True)
        path = self.lock_dir / f"{edit_id}.lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: a recovery may be probing it for a moment
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(path).st_ino == os.fstat(fd).st_ino:
                        return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # a recovery removed the file before it was locked: lock a new one

    def _release(self, edit_id: str, fd: int | None) -> None:
        """Unlock, once the edit's row left ``pending`` (a recovery taking the lock then changes nothing)."""
        if fd is not None:
            (self.lock_dir / f"{edit_id}.lock").unlink(missing_ok=True)
            os.close(fd)

    def _owner(self, edit_id: str) -> int | None:
        rows = self._query("SELECT owner_pid FROM edits WHERE id = ?", (edit_id,))
        return rows[0]["owner_pid"] if rows else None

    # -- recovery ------------------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Abort pending edits whose process is gone and remove their files; ids of the aborted edits.

        Runs when the ledger is opened. A pending edit is being computed while its lock file is locked
        (``_live``); those of live processes (another server, this one) are left alone.
        """
        aborted = []
        for row in self._query("SELECT id, owner_pid FROM edits WHERE state = 'pending'"):
            if self._live(row["id"], row["owner_pid"]):
                continue
            with self._tx() as db:
                cur = db.execute(
                    "UPDATE edits SET state = 'aborted', error = ? WHERE id = ? AND state = 'pending'",
                    (
                        f"interrupted: its process (pid {row['owner_pid']}) ended before the edit was "
                        "committed",
                        row["id"],
                    ),
                )
                if cur.rowcount:
                    self._log(db, row["id"], "aborted", "recovered after its process ended")
                    aborted.append(row["id"])
        # Files of no committed edit: left by a process killed between writing a patch file and committing.
        live = {
            r["id"]
            for r in self._query("SELECT id, owner_pid FROM edits WHERE state = 'pending'")
            if self._live(r["id"], r["owner_pid"])
        }
        for path in self.lock_dir.glob("*.lock") if self.lock_dir.is_dir() else ():
            if path.stem not in live and not _lock_held(path):
                path.unlink(missing_ok=True)
        keep = {
            r["patch_file"] for r in self._query("SELECT patch_file FROM edits WHERE patch_file IS NOT NULL")
        }
        for path in self.patch_dir.iterdir():
            stem = path.name.split(".", 1)[0]
            if path.name not in keep and stem not in live and path.is_file():
                path.unlink(missing_ok=True)
        return aborted

    # -- applying the ledger to a model ----------------------------------------------------------------------
    def _check_model(self, model: nn.Module, entries: list[Entry]) -> None:
        fp = fingerprint(model)
        for e in entries:
            if e.fingerprint != fp:
                raise LedgerError(
                    f"{self.path} holds edit {e.id} for model {e.fingerprint}, but this model is {fp}: "
                    "load the base model the edits were made on"
                )

    def sync(self, model: nn.Module) -> bool:
        """Make the model's applied patches exactly the ledger's applied edits, in ledger order.

        Idempotent (nothing happens when they already match); removed edits are reverted (re-derived from
        the base values), new ones applied; anything else is a full replay. True if the weights changed.
        """
        want = [e.id for e in self.entries("applied")]
        have = [p.id for p in applied_patches(model)]
        if have == want:
            return False
        self._check_model(model, self.entries("applied"))
        patches = [self.patch(i) for i in want]  # load and check every file before touching the model
        wanted = set(want)
        kept = [i for i in have if i in wanted]
        if kept == want[: len(kept)]:
            for p in applied_patches(model):
                if p.id not in wanted:
                    p.revert(model)
            for p in patches[len(kept) :]:
                p.apply(model)
        else:
            self._replay(model, patches)
        return True

    def replay(self, model: nn.Module) -> list[Entry]:
        """Revert every patch of the model, then apply the ledger's applied edits in order."""
        entries = self.entries("applied")
        self._check_model(model, entries)
        self._replay(model, [self.patch(e.id) for e in entries])
        return entries

    @staticmethod
    def _replay(model: nn.Module, patches: list[Patch]) -> None:
        revert_all(model)
        for p in patches:
            p.apply(model)

    # -- writing -------------------------------------------------------------------------------------------
    def edit(
        self,
        model: nn.Module,
        tokenizer,
        requests: EditRequest | dict | Sequence[EditRequest | dict],
        method: str = "default",
        hparams: dict[str, Any] | None = None,
        answer_tokens: int = 8,
        verify: bool = True,
        audit: Audit | None = None,
        idempotency: tuple[str, str] | None = None,
    ) -> Entry:
        """Compute an edit on ``model`` (which should be in sync with the ledger), record it, apply it.

        ``verify``: the edit is checked in generation first (``Editor.edit(verify=True)``); its verdict is
        in the entry's ``metrics["verify"]`` (``holds``, per prompt). An edit that does not hold is still
        recorded and applied: the caller sees the verdict and may revert it.

        ``audit``: who asked and from where, kept with the edit's events. ``idempotency``: (key, SHA-256 of
        the request) recorded with the intent, in its transaction; a key recorded before raises
        ``IdempotencyKeyError`` and nothing is recorded (see ``idempotency_key``).

        The returned entry has the metrics before and after and the patch. Errors in the method, its
        hyperparameters or the requests are raised before anything is recorded; an edit that fails or
        is interrupted while it is computed ends ``aborted``, never half applied.
        """
        from .editor import create_editor, resolve_method

        method = resolve_method(method)
        requests = _as_requests(requests)
        check_for_model(requests, model, tokenizer)  # before the editor or any generation touches the model
        editor = create_editor(method, model, tokenizer, **(hparams or {}))
        for r in requests:
            r.validate(needs_subject=editor.needs_subject)
        entry_id = uuid.uuid4().hex[:12]
        lock = self._hold(entry_id)  # before the row exists: a pending row without a held lock is stale
        try:
            self._begin(entry_id, model, method, editor, requests, audit, idempotency)
            return self._compute(entry_id, model, tokenizer, editor, requests, answer_tokens, verify, audit)
        finally:
            self._release(entry_id, lock)

    def _begin(
        self,
        entry_id: str,
        model: nn.Module,
        method: str,
        editor: Any,
        requests: list[EditRequest],
        audit: Audit | None,
        idempotency: tuple[str, str] | None,
    ) -> None:
        """Record the intent: a pending row (and the idempotency key) in one transaction."""
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO edits (id, state, created_at, fingerprint, method, hparams, requests, "
                    "owner_pid) VALUES (?, 'pending', ?, ?, ?, ?, ?, ?)",
                    (
                        entry_id,
                        _now(),
                        fingerprint(model),
                        method,
                        json.dumps(dataclasses.asdict(editor.config), default=str),
                        json.dumps([r.to_dict() for r in requests], default=str),
                        os.getpid(),
                    ),
                )
                if idempotency is not None:
                    db.execute(
                        "INSERT INTO idempotency_keys (key, request_sha256, edit_id, created_at) "
                        "VALUES (?, ?, ?, ?)",
                        (*idempotency, entry_id, _now()),
                    )
                self._log(db, entry_id, "begin", audit=audit)
        except sqlite3.IntegrityError:
            if idempotency is None:
                raise
            # the key's row exists: another request recorded it first (the transaction recorded nothing)
            raise IdempotencyKeyError(f"idempotency key {idempotency[0]!r} is in use already") from None

    def _compute(
        self,
        entry_id: str,
        model: nn.Module,
        tokenizer: Any,
        editor: Any,
        requests: list[EditRequest],
        answer_tokens: int,
        verify: bool,
        audit: Audit | None,
    ) -> Entry:
        """Compute, apply and commit a recorded edit; on any failure it ends aborted."""
        patch = None
        try:
            before = measure(model, tokenizer, requests, answer_tokens)
            start = time.perf_counter()
            patch = editor.edit(requests, verify=verify)
            seconds = time.perf_counter() - start
            patch.id = entry_id
            patch.apply(model)
            after = measure(model, tokenizer, requests, answer_tokens)
            metrics = {
                "seconds": seconds,
                **({"holds": v["holds"], "verify": v} if (v := patch.info.get("verify")) else {}),
                "requests": [
                    {f"{k}_before": v for k, v in b.items()} | {f"{k}_after": v for k, v in a.items()}
                    for b, a in zip(before, after)
                ],
            }
            name, digest, size = self._write_patch(patch)
            with self._tx() as db:
                cur = db.execute(
                    "UPDATE edits SET state = 'applied', applied_at = ?, metrics = ?, patch_file = ?, "
                    "patch_sha256 = ?, patch_bytes = ?, hparams = ?, owner_pid = NULL "
                    "WHERE id = ? AND state = 'pending'",
                    (
                        _now(),
                        json.dumps(metrics),
                        name,
                        digest,
                        size,
                        json.dumps(patch.hparams, default=str),
                        entry_id,
                    ),
                )
                if cur.rowcount != 1:
                    raise LedgerError(f"edit {entry_id} was aborted by another process while it was computed")
                self._log(db, entry_id, "applied", audit=audit)
        except BaseException as e:
            if patch is not None and any(p is patch for p in applied_patches(model)):
                patch.revert(model)
            message = f"{type(e).__name__}: {e}".strip()
            with contextlib.suppress(Exception), self._tx() as db:
                db.execute(
                    "UPDATE edits SET state = 'aborted', error = ?, owner_pid = NULL "
                    "WHERE id = ? AND state = 'pending'",
                    (message[:2000], entry_id),
                )
                self._log(db, entry_id, "aborted", message[:2000], audit=audit)
            for suffix in ("", ".partial"):
                self._file(f"{entry_id}.safetensors{suffix}").unlink(missing_ok=True)
            raise
        self._patches[entry_id] = patch
        entry = self.get(entry_id)
        entry.patch = patch
        return entry

    def revert(self, edit_id: str, model: nn.Module | None = None, audit: Audit | None = None) -> Entry:
        """Mark an applied edit reverted (one transaction); re-derive ``model``'s weights if given.
        ``audit``: who asked and from where, kept with the event."""
        entry = self.get(edit_id)
        if entry.state != "applied":
            raise EditStateError(f"edit {entry.id} is {entry.state}, not applied: nothing to revert")
        with self._tx() as db:
            cur = db.execute(
                "UPDATE edits SET state = 'reverted', reverted_at = ? WHERE id = ? AND state = 'applied'",
                (_now(), entry.id),
            )
            if cur.rowcount != 1:
                raise EditStateError(f"edit {entry.id} was reverted by someone else meanwhile")
            self._log(db, entry.id, "reverted", audit=audit)
        if model is not None:
            self.sync(model)
        return self.get(entry.id)

    # -- idempotency keys (the service's Idempotency-Key header) ---------------------------------------------
    def idempotency_key(self, key: str) -> dict | None:
        """The record of an idempotency key: request_sha256, edit_id, created_at, and the first response
        (status, response: None until it was sent); None for a key not seen."""
        rows = self._query("SELECT * FROM idempotency_keys WHERE key = ?", (key,))
        if not rows:
            return None
        record = dict(rows[0])
        record["response"] = None if record["response"] is None else json.loads(record["response"])
        return record

    def remember_response(self, key: str, status: int, response: dict) -> None:
        """Keep the first response to a keyed request, for its retries (only once)."""
        with self._tx() as db:
            db.execute(
                "UPDATE idempotency_keys SET status = ?, response = ? WHERE key = ? AND status IS NULL",
                (status, json.dumps(response, default=str), key),
            )

    def forget_key(self, key: str) -> None:
        """Free a key whose edit ended without a response (its process died): nothing was applied."""
        with self._tx() as db:
            db.execute("DELETE FROM idempotency_keys WHERE key = ? AND status IS NULL", (key,))

    # -- export / import -----------------------------------------------------------------------------------
    def export(self, folder: str | Path) -> Path:
        """Write ``folder/ledger.json`` and ``folder/patches/*.safetensors`` (applied and reverted edits).

        Written into a temporary folder beside it, renamed into place when complete: a failed export
        leaves nothing behind, and the same command can be run again."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise LedgerError(f"{folder} exists and is not a folder; export into a new folder")
        if folder.exists() and any(folder.iterdir()):
            raise LedgerError(f"{folder} exists and is not empty; export into a new folder")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{folder.name}.partial-{uuid.uuid4().hex[:8]}")
        try:
            (tmp / "patches").mkdir(parents=True)
            entries = [e for e in self.entries() if e.state in ("applied", "reverted")]
            for e in entries:
                self.patch(e.id)  # checks the hash before copying
                shutil.copyfile(self._file(e.patch_file), tmp / "patches" / e.patch_file)
            manifest = {
                "format": EXPORT_FORMAT,
                "version": SCHEMA_VERSION,
                "exported_at": _now(),
                "source": str(self.path),
                "entries": [e.to_dict() for e in entries],
            }
            (tmp / "ledger.json").write_text(json.dumps(manifest, indent=1))
            tmp.replace(folder)  # POSIX: also over an empty folder
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder / "ledger.json"

    def import_(self, folder: str | Path) -> tuple[list[str], list[str]]:
        """Add the edits of an exported ledger after this one's, in their order; (imported ids, skipped ids).

        Edits whose id is already here are skipped. The manifest is untrusted input: ids and file names must
        be the ones a ledger makes (12 hex digits, ``<id>.safetensors``), every path must stay inside the
        export's ``patches/`` folder and this ledger's patch folder, and every patch is loaded and its id,
        fingerprint and SHA-256 compared with the manifest before anything is written. All or nothing: a
        failed import leaves no rows and no files behind.
        """
        folder = Path(folder)
        manifest_path = folder / "ledger.json" if folder.is_dir() else folder
        folder = manifest_path.parent
        try:
            manifest = json.loads(manifest_path.read_text())
        except OSError as e:
            raise LedgerError(f"cannot read {manifest_path}: {e.strerror or e}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LedgerError(f"{manifest_path} is not JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
            raise LedgerError(f"{manifest_path} is not a modeledit ledger export")
        items = manifest.get("entries", [])
        if not isinstance(items, list):
            raise LedgerError(f"{manifest_path}: 'entries' is not a list")
        source_dir = (folder / "patches").resolve()
        existing = {e.id for e in self.entries()}
        fingerprints = {e.fingerprint for e in self.entries() if e.state in ("applied", "reverted")}
        new: list[tuple[Entry, Path]] = []
        skipped: list[str] = []
        seen: set[str] = set()
        for i, item in enumerate(items):
            e = _manifest_entry(manifest_path, i, item)
            if e.id in seen:
                raise LedgerError(f"{manifest_path}: edit {e.id} appears twice")
            seen.add(e.id)
            if e.id in existing:
                skipped.append(e.id)
                continue
            if fingerprints and e.fingerprint not in fingerprints:
                raise LedgerError(
                    f"{manifest_path}: edit {e.id} is for model {e.fingerprint}; this ledger's edits are for "
                    f"{', '.join(sorted(fingerprints))}"
                )
            new.append((e, self._checked_source(manifest_path, source_dir, e)))
        written: list[Path] = []
        try:
            for e, source in new:
                target = self._file(f"{e.id}.safetensors")
                if target.resolve().parent != self.patch_dir.resolve():  # cannot happen with a checked id
                    raise LedgerError(f"{manifest_path}: edit {e.id} would be written outside the ledger")
                tmp = target.with_name(target.name + ".partial")
                written.append(tmp)
                shutil.copyfile(source, tmp)
                _fsync(tmp)
                if _sha256(tmp) != e.patch_sha256:  # the source changed after it was checked
                    raise LedgerError(f"{manifest_path}: patch file of edit {e.id} changed while importing")
                written.append(target)
                tmp.replace(target)
                e.patch_file = target.name
            with self._tx() as db:
                for e, _ in new:
                    db.execute(
                        "INSERT INTO edits (id, state, created_at, applied_at, reverted_at, fingerprint, "
                        "method, hparams, requests, metrics, patch_file, patch_sha256, patch_bytes) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            e.id,
                            e.state,
                            e.created_at,
                            e.applied_at,
                            e.reverted_at,
                            e.fingerprint,
                            e.method,
                            json.dumps(e.hparams),
                            json.dumps(e.requests),
                            None if e.metrics is None else json.dumps(e.metrics),
                            e.patch_file,
                            e.patch_sha256,
                            e.patch_bytes,
                        ),
                    )
                    self._log(db, e.id, "imported", str(manifest_path))
        except BaseException:
            for path in written:  # all or nothing: no file of a failed import stays behind
                path.unlink(missing_ok=True)
            raise
        return [e.id for e, _ in new], skipped

    def _checked_source(self, manifest_path: Path, source_dir: Path, e: Entry) -> Path:
        """The export's patch file of ``e``, inside ``source_dir``, loaded and matching the manifest."""
        source = (source_dir / str(e.patch_file)).resolve()
        if source.parent != source_dir:  # a symbolic link out of the export
            raise LedgerError(f"{manifest_path}: patch file of edit {e.id} lies outside {source_dir}")
        if not source.is_file():
            raise LedgerError(f"{manifest_path}: patch file of edit {e.id} is missing ({source})")
        _load_recorded(source, e, f"{manifest_path}: ", f"patch file of edit {e.id}", "the manifest says")
        return source
