"""The edit ledger on a tiny llama: records, revert of any edit, replay bit for bit (also in a fresh process),
export/import, the CLI, and crash safety with real processes killed by SIGKILL mid-edit and mid-revert."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_model
from typer.testing import CliRunner

from modeledit import EditRequestError, Ledger, Patch
from modeledit.cli import app
from modeledit.ledger import EditStateError, LedgerError, UnknownEditError, weights_digest
from modeledit.models import fingerprint, load_model
from modeledit.patch import PatchError, applied_patches

HPARAMS = {"steps": 5, "lr": 0.05}
FACTS = [("Zorbia", "Quux"), ("Ylland", "Blip"), ("Xer", "Mop"), ("Wum", "Zap")]
SRC = Path(__file__).resolve().parents[1] / "src"


def request(i: int) -> dict:
    subject, target = FACTS[i % len(FACTS)]
    return {
        "prompt": "The capital of {} is",
        "subject": subject,
        "target_new": target,
        "target_true": "Paris",
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_digest(model_dir):
    return weights_digest(load_model(str(model_dir))[0])


def fresh(model_dir):
    return load_model(str(model_dir))


def independent_digest(model_dir, ledger: Ledger) -> str:
    """base + each applied patch's deltas added in ledger order, without Patch.apply: what replay gives."""
    model, _ = fresh(model_dir)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for e in ledger.entries("applied"):
            patch = Patch.load(ledger.patch_dir / e.patch_file)
            for name in patch.deltas:
                params[name].add_(patch.dense(name))
    return weights_digest(model)


def test_an_edit_is_recorded_with_everything(model_dir, tmp_path):
    model, tok = fresh(model_dir)
    ledger = Ledger(tmp_path / "edits.db")
    entry = ledger.edit(model, tok, request(0), method="ft", hparams=HPARAMS)
    assert entry.state == "applied" and entry.method == "ft" and entry.fingerprint == fingerprint(model)
    assert entry.hparams["steps"] == 5 and entry.hparams["lr"] == 0.05 and "num_blocks" in entry.hparams
    assert entry.requests[0]["target_new"] == "Quux" and entry.created_at and entry.applied_at
    m = entry.metrics["requests"][0]
    assert m["p_new_after"] > m["p_new_before"] and {"p_true_before", "answer_before", "answer_after"} <= set(
        m
    )
    path = ledger.patch_dir / entry.patch_file
    assert path.stat().st_size == entry.patch_bytes and len(entry.patch_sha256) == 64
    assert Patch.load(path).id == entry.id == applied_patches(model)[0].id
    assert [e["action"] for e in ledger.events(entry.id)] == ["begin", "applied"]
    assert ledger.get(entry.id[:6]).id == entry.id  # unique prefixes work
    assert ledger.verify() == []


def test_revert_any_edit_rederives_weights_bit_for_bit(model_dir, tmp_path, base_digest):
    model, tok = fresh(model_dir)
    ledger = Ledger(tmp_path / "edits.db")
    ids = [ledger.edit(model, tok, request(i), method="ft", hparams=HPARAMS).id for i in range(3)]
    assert weights_digest(model) != base_digest
    ledger.revert(ids[1], model)  # the middle one, not the last
    assert [p.id for p in applied_patches(model)] == [ids[0], ids[2]]
    assert ledger.get(ids[1]).state == "reverted" and ledger.get(ids[1]).reverted_at
    replayed, _ = fresh(model_dir)
    assert ledger.sync(replayed) is True and ledger.sync(replayed) is False  # idempotent
    assert weights_digest(model) == weights_digest(replayed) == independent_digest(model_dir, ledger)
    ledger.revert(ids[0], model)
    ledger.revert(ids[2], model)
    assert weights_digest(model) == base_digest  # exactly the base weights again, no drift
    with pytest.raises(EditStateError, match="not applied"):
        ledger.revert(ids[0], model)
    with pytest.raises(UnknownEditError):
        ledger.get("feedbeef0000")


def test_replay_in_a_fresh_process_gives_identical_weights(model_dir, tmp_path):
    model, tok = fresh(model_dir)
    db = tmp_path / "edits.db"
    ledger = Ledger(db)
    ids = [ledger.edit(model, tok, request(i), method="ft", hparams=HPARAMS).id for i in range(3)]
    ledger.revert(ids[0], model)
    ledger.close()
    code = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from modeledit import Ledger, load_model\n"
        "from modeledit.ledger import weights_digest\n"
        "model, _ = load_model(sys.argv[1]); Ledger(sys.argv[2]).replay(model)\n"
        "print('DIGEST', weights_digest(model))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SRC))
    out = subprocess.run(
        [sys.executable, "-c", code, str(model_dir), str(db)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    digest = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("DIGEST")][0]
    assert digest == weights_digest(model)


def test_sync_follows_changes_made_by_another_process(model_dir, tmp_path):
    model, tok = fresh(model_dir)
    ledger = Ledger(tmp_path / "edits.db")
    ids = [ledger.edit(model, tok, request(i), method="ft", hparams=HPARAMS).id for i in range(2)]
    version = ledger.version()
    other = Ledger(tmp_path / "edits.db")  # e.g. `modeledit ledger revert` while a server runs
    other.revert(ids[0])
    assert ledger.version() > version
    assert ledger.sync(model) is True
    assert [p.id for p in applied_patches(model)] == [ids[1]]
    assert weights_digest(model) == independent_digest(model_dir, ledger)


def test_bad_edits_record_nothing_or_end_aborted(model_dir, tmp_path, base_digest, monkeypatch):
    model, tok = fresh(model_dir)
    ledger = Ledger(tmp_path / "edits.db")
    with pytest.raises(ValueError, match="unknown method"):
        ledger.edit(model, tok, request(0), method="nope")
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        ledger.edit(model, tok, request(0), method="ft", hparams={"bogus": 1})
    with pytest.raises(EditRequestError, match="target_new"):
        ledger.edit(model, tok, {"prompt": "Hello", "target_new": " "}, method="ft")
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got 'fast'"):
        ledger.edit(model, tok, request(0), method="ft", hparams={"lr": "fast"})  # checked before recording
    assert ledger.entries() == []
    # fails while computing: recorded as aborted, the model untouched
    from modeledit.methods.ft import FineTune

    def broken(self, requests):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(FineTune, "compute_deltas", broken)
    with pytest.raises(TypeError):
        ledger.edit(model, tok, request(0), method="ft")
    (entry,) = ledger.entries()
    assert entry.state == "aborted" and "TypeError" in entry.error and entry.patch_file is None
    assert weights_digest(model) == base_digest and applied_patches(model) == []
    assert list(ledger.patch_dir.iterdir()) == [] and ledger.verify() == []


def test_a_diverged_edit_ends_aborted_and_changes_nothing(model_dir, tmp_path, base_digest):
    model, tok = fresh(model_dir)
    ledger = Ledger(tmp_path / "edits.db")
    with pytest.raises(PatchError, match=r"is not finite .* change lr=1e\+30"):
        ledger.edit(model, tok, request(0), method="ft", hparams={"steps": 3, "lr": 1e30})
    (entry,) = ledger.entries()
    assert entry.state == "aborted" and "PatchError" in entry.error and entry.patch_file is None
    assert weights_digest(model) == base_digest and applied_patches(model) == []
    assert list(ledger.patch_dir.iterdir()) == [] and ledger.verify() == []
    ledger.close()
    assert Ledger(tmp_path / "edits.db").entries("applied") == []  # nothing comes back on a restart


def _pending_row(db: Path, edit_id: str, pid: int) -> None:
    """A pending row as a process killed mid-edit leaves it (the PID it recorded)."""
    con = sqlite3.connect(db)
    con.execute(
        "INSERT INTO edits (id, state, created_at, fingerprint, method, hparams, requests, owner_pid) "
        "VALUES (?, 'pending', '2025-01-01T00:00:00', 'fp', 'ft', '{}', '[]', ?)",
        (edit_id, pid),
    )
    con.commit()
    con.close()


def test_pending_rows_are_recovered_by_their_lock_not_their_pid(tmp_path):
    """The PID a killed process recorded may belong to a live process now (PID reuse; PID 1 again in a
    container), here this very process: the row is recovered, since nobody holds its lock. A row whose lock
    is held (by another open file of this process, too) stays pending, and keeps its files."""
    import fcntl

    db = tmp_path / "edits.db"
    Ledger(db).close()
    stale, first, live = "0123456789ab", "ba9876543210", "aaaaaaaaaaaa"
    _pending_row(db, stale, os.getpid())
    _pending_row(db, first, 1)
    _pending_row(db, live, os.getpid())
    patches, locks = tmp_path / "edits.db.patches", tmp_path / "edits.db.locks"
    for edit_id in (stale, live):
        (patches / f"{edit_id}.safetensors.partial").write_bytes(b"half")
    locks.mkdir()
    (locks / f"{stale}.lock").touch()  # left behind, locked by nobody
    fd = os.open(locks / f"{live}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with Ledger(db) as ledger:  # recovery runs here
            assert {e.id: e.state for e in ledger.entries()} == {
                stale: "aborted",
                first: "aborted",
                live: "pending",
            }
            assert ledger.get(stale).error == (
                f"interrupted: its process (pid {os.getpid()}) ended before the edit was committed"
            )
        assert sorted(p.name for p in patches.iterdir()) == [f"{live}.safetensors.partial"]
        assert sorted(p.name for p in locks.iterdir()) == [f"{live}.lock"]
    finally:
        os.close(fd)  # as when its process ends: the kernel drops the lock
    with Ledger(db) as ledger:
        assert ledger.get(live).state == "aborted" and not any(patches.iterdir()) and not any(locks.iterdir())


def test_an_edit_holds_its_lock_while_it_is_computed(model_dir, tmp_path, monkeypatch):
    from modeledit.ledger import _lock_held
    from modeledit.methods.ft import FineTune

    model, tok = fresh(model_dir)
    db = tmp_path / "edits.db"
    ledger = Ledger(db)
    seen = {}
    compute = FineTune.compute_deltas

    def spy(self, requests):
        (pending,) = ledger.entries("pending")
        seen["held"] = _lock_held(ledger.lock_dir / f"{pending.id}.lock")
        with Ledger(db) as other:  # another ledger opened meanwhile, in this same process: recovery
            seen["state"] = other.get(pending.id).state
        return compute(self, requests)

    monkeypatch.setattr(FineTune, "compute_deltas", spy)
    entry = ledger.edit(model, tok, request(0), method="ft", hparams=HPARAMS)
    assert seen == {"held": True, "state": "pending"} and entry.state == "applied"
    assert not any(ledger.lock_dir.iterdir())  # released and removed


def test_wrong_model_and_corrupt_patch_are_refused(model_dir, tmp_path):
    model, tok = fresh(model_dir)
    ledger = Ledger(tmp_path / "edits.db")
    entry = ledger.edit(model, tok, request(0), method="ft", hparams=HPARAMS)
    other = tiny_model("llama", seed=1)
    with pytest.raises(LedgerError, match="this model is"):
        ledger.sync(other)
    path = ledger.patch_dir / entry.patch_file
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    reopened = Ledger(tmp_path / "edits.db")
    with pytest.raises(LedgerError, match="corrupt"):
        reopened.replay(fresh(model_dir)[0])
    assert any("corrupt" in p for p in reopened.verify())
    with pytest.raises(LedgerError, match="not a modeledit ledger"):
        Ledger(path)  # a file that is not a database


def test_export_import_roundtrip(model_dir, tmp_path):
    model, tok = fresh(model_dir)
    source = Ledger(tmp_path / "a.db")
    ids = [source.edit(model, tok, request(i), method="ft", hparams=HPARAMS).id for i in range(3)]
    source.revert(ids[1], model)
    source.export(tmp_path / "export")
    target = Ledger(tmp_path / "b.db")
    imported, skipped = target.import_(tmp_path / "export")
    assert imported == ids and skipped == []
    assert [(e.id, e.state) for e in target.entries()] == [(e.id, e.state) for e in source.entries()]
    replayed, _ = fresh(model_dir)
    target.sync(replayed)
    assert weights_digest(replayed) == weights_digest(model)
    assert target.import_(tmp_path / "export") == ([], ids)  # idempotent
    with pytest.raises(LedgerError, match="not empty"):
        source.export(tmp_path / "export")
    # edits made on another model are refused
    other_dir = tmp_path / "other-model"
    tiny_model("llama", seed=1).save_pretrained(other_dir)
    char_tokenizer().save_pretrained(other_dir)
    other, other_tok = load_model(str(other_dir))
    foreign = Ledger(tmp_path / "c.db")
    foreign.edit(other, other_tok, request(0), method="ft", hparams=HPARAMS)
    with pytest.raises(LedgerError, match="for model"):
        foreign.import_(tmp_path / "export")


def test_a_failed_export_leaves_nothing_and_can_be_retried(model_dir, tmp_path, monkeypatch):
    import modeledit.ledger as ledger_module

    model, tok = fresh(model_dir)
    source = Ledger(tmp_path / "a.db")
    ids = [source.edit(model, tok, request(i), method="ft", hparams=HPARAMS).id for i in range(2)]
    out = tmp_path / "exports" / "out"
    copies = []
    copyfile = shutil.copyfile

    def fail_on_the_second(src, dst):
        copies.append(dst)
        if len(copies) == 2:
            raise OSError(28, "No space left on device")
        return copyfile(src, dst)

    monkeypatch.setattr(ledger_module.shutil, "copyfile", fail_on_the_second)
    with pytest.raises(OSError, match="No space left"):
        source.export(out)
    assert list((tmp_path / "exports").iterdir()) == []  # no half-written folder, no temporary one
    monkeypatch.undo()
    result = runner.invoke(app, ["ledger", "export", "--db", str(tmp_path / "a.db"), "--out", str(out)])
    assert result.exit_code == 0 and "exported 2 edits" in result.output, result.output
    assert [e["id"] for e in json.loads((out / "ledger.json").read_text())["entries"]] == ids
    assert list((tmp_path / "exports").iterdir()) == [out]
    (tmp_path / "empty").mkdir()  # an empty folder may be the target; a file may not
    source.export(tmp_path / "empty")
    (tmp_path / "file").touch()
    with pytest.raises(LedgerError, match="exists and is not a folder"):
        source.export(tmp_path / "file")


# -- import treats the manifest as untrusted -----------------------------------------------------------------


@pytest.fixture
def export(model_dir, tmp_path):
    """An export of two applied edits: (its folder, its manifest as a dict)."""
    model, tok = fresh(model_dir)
    source = Ledger(tmp_path / "a.db")
    for i in range(2):
        source.edit(model, tok, request(i), method="ft", hparams={"steps": 2, "lr": 0.05})
    source.export(tmp_path / "export")
    source.close()
    return tmp_path / "export", json.loads((tmp_path / "export" / "ledger.json").read_text())


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _refused(folder: Path, manifest: dict, target: Ledger, match: str) -> str:
    """Import a tampered manifest: refused with one line, nothing written, the target ledger unchanged."""
    (folder / "ledger.json").write_text(json.dumps(manifest))
    rows, files = target.entries(), _files(target.patch_dir.parent)
    with pytest.raises(LedgerError, match=match) as info:
        target.import_(folder)
    assert "\n" not in str(info.value)
    assert target.entries() == rows and _files(target.patch_dir.parent) == files
    return str(info.value)


def test_import_refuses_an_id_that_is_a_path(export, tmp_path):
    folder, manifest = export
    target = Ledger(tmp_path / "ledger" / "b.db")
    outside = tmp_path / "outside"
    outside.mkdir()
    relative = os.path.relpath(outside / "PWNED", target.patch_dir)  # ../../outside/PWNED
    for bad in ("../../../../tmp/x/PWNED", relative):
        tampered = json.loads(json.dumps(manifest))
        tampered["entries"][1]["id"] = bad  # patch_file and hash untouched: the bytes a writer would copy
        _refused(folder, tampered, target, "invalid id")
        tampered["entries"][1]["patch_file"] = bad + ".safetensors"
        _refused(folder, tampered, target, "invalid id")
    assert list(outside.iterdir()) == [] and not Path("/tmp/x/PWNED.safetensors").exists()
    (folder / "ledger.json").write_text(json.dumps(manifest))
    assert target.import_(folder) == ([e["id"] for e in manifest["entries"]], [])  # the genuine one works


def test_import_refuses_a_patch_file_outside_the_export(export, tmp_path):
    folder, manifest = export
    target = Ledger(tmp_path / "b.db")
    secret = tmp_path / "secret.txt"
    secret.write_text("not a patch")
    relative = os.path.relpath(secret, folder / "patches")
    for bad, file in [("../../../../etc/hostname", Path("/etc/hostname")), (relative, secret)]:
        tampered = json.loads(json.dumps(manifest))
        tampered["entries"][0]["patch_file"] = bad
        if file.exists():
            tampered["entries"][0]["patch_sha256"] = _sha(file)  # the hash check alone would pass
        _refused(folder, tampered, target, "invalid patch_file")
    # a symbolic link inside patches/ that leads out of the export
    entry = manifest["entries"][0]
    link = folder / "patches" / entry["patch_file"]
    original = link.read_bytes()
    link.unlink()
    link.symlink_to(secret)
    tampered = json.loads(json.dumps(manifest))
    tampered["entries"][0]["patch_sha256"] = _sha(secret)
    _refused(folder, tampered, target, "lies outside")
    link.unlink()
    link.write_bytes(original)
    assert target.entries() == [] and list(target.patch_dir.iterdir()) == []


def test_import_loads_each_patch_and_checks_it_against_the_manifest(export, tmp_path):
    folder, manifest = export
    target = Ledger(tmp_path / "b.db")
    first, second = manifest["entries"]
    # the second edit's file holds the first edit's patch (hash updated to match): another edit's patch
    wrong = folder / "patches" / second["patch_file"]
    saved = wrong.read_bytes()
    shutil.copyfile(folder / "patches" / first["patch_file"], wrong)
    tampered = json.loads(json.dumps(manifest))
    tampered["entries"][1]["patch_sha256"] = _sha(wrong)
    message = _refused(folder, tampered, target, "belongs to another edit")
    assert second["id"] in message
    wrong.write_bytes(b"junk")  # not a patch at all
    tampered["entries"][1]["patch_sha256"] = _sha(wrong)
    _refused(folder, tampered, target, "not a readable safetensors patch")
    wrong.write_bytes(saved)
    tampered = json.loads(json.dumps(manifest))
    tampered["entries"][1]["fingerprint"] = "0" * 32  # the manifest lies about the model
    _refused(folder, tampered, target, "belongs to another edit or model")
    _refused(
        folder, {**manifest, "entries": [first, {**second, "patch_sha256": "0" * 64}]}, target, "is corrupt"
    )
    _refused(folder, {**manifest, "entries": [first, first]}, target, "appears twice")
    _refused(folder, {**manifest, "entries": [first, "x"]}, target, "not a JSON object")
    _refused(folder, {**manifest, "entries": [first, {**second, "hparams": "x"}]}, target, "invalid hparams")
    _refused(folder, {**manifest, "entries": [first, {**second, "patch_sha256": "../x"}]}, target, "sha256")
    # a failure while writing (the database refuses) leaves no file of the import behind
    (folder / "ledger.json").write_text(json.dumps(manifest))

    def broken_tx():
        raise sqlite3.OperationalError("disk I/O error")

    target._tx = broken_tx
    with pytest.raises(sqlite3.OperationalError):
        target.import_(folder)
    assert list(target.patch_dir.iterdir()) == [] and target.entries() == []


# -- the CLI -------------------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_ledger_commands(model_dir, tmp_path):
    model, tok = fresh(model_dir)
    db = tmp_path / "edits.db"
    ledger = Ledger(db)
    ids = [ledger.edit(model, tok, request(i), method="ft", hparams=HPARAMS).id for i in range(2)]
    ledger.close()

    result = runner.invoke(app, ["ledger", "list", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert ids[0] in result.output and "applied" in result.output and "Zorbia" in result.output

    result = runner.invoke(app, ["ledger", "show", ids[1][:8], "--db", str(db)])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["id"] == ids[1] and [e["action"] for e in shown["events"]] == ["begin", "applied"]

    result = runner.invoke(app, ["ledger", "revert", ids[0], "--db", str(db)])
    assert result.exit_code == 0 and "reverted" in result.output, result.output
    last = Ledger(db, read_only=True).events(ids[0])[-1]  # the audit trail: who, from where
    assert last["action"] == "reverted" and last["actor"].startswith("cli:") and last["client"] == "local"

    result = runner.invoke(app, ["ledger", "replay", "--db", str(db), "--model", str(model_dir)])
    assert result.exit_code == 0, result.output
    ledger = Ledger(db)
    ledger.sync(model)
    assert "replayed 1 edits" in result.output and weights_digest(model) in result.output

    out = tmp_path / "export"
    result = runner.invoke(app, ["ledger", "export", "--db", str(db), "--out", str(out)])
    assert result.exit_code == 0 and (out / "ledger.json").exists(), result.output
    result = runner.invoke(app, ["ledger", "import", str(out), "--db", str(tmp_path / "copy.db")])
    assert result.exit_code == 0 and "imported 2 edits" in result.output, result.output

    for args, message in [
        (["ledger", "list", "--db", str(tmp_path / "missing.db")], "no ledger database"),
        (["ledger", "show", "feedbeef0000", "--db", str(db)], "no edit"),
        (["ledger", "revert", ids[0], "--db", str(db)], "not applied"),
        (["ledger", "list", "--db", str(db), "--state", "weird"], "unknown state"),
        (["ledger", "import", str(tmp_path / "nothing"), "--db", str(db)], "cannot read"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output


# -- opening a file: another application's database is never modified; read-only ledgers can be read ---------


def _state_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} | {
        p.name + "/": b"" for p in folder.iterdir() if p.is_dir()
    }


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_a_foreign_sqlite_file_is_never_modified(tmp_path, journal):
    folder = tmp_path / "app"
    folder.mkdir()
    path = folder / "app.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA journal_mode={journal}")
    db.execute("CREATE TABLE meta (key TEXT, value TEXT)")  # even a table of the same name
    db.execute("INSERT INTO meta VALUES ('owner', 'someone else')")
    db.commit()
    db.close()
    before = _state_of(folder)
    for read_only in (False, True):
        with pytest.raises(LedgerError, match="another application") as info:
            Ledger(path, read_only=read_only)
        assert "\n" not in str(info.value)
    for args in (["ledger", "list"], ["ledger", "show", "abc"], ["ledger", "revert", "abc"]):
        result = runner.invoke(app, [*args, "--db", str(path)])
        assert result.exit_code == 2, result.output
        assert "another application" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["ledger", "import", str(tmp_path / "nothing"), "--db", str(path)])
    assert result.exit_code == 2 and "another application" in result.output, result.output
    assert _state_of(folder) == before  # same bytes, no -wal/-shm files, no .patches folder


def test_new_and_legacy_ledgers_open(tmp_path):
    empty = tmp_path / "empty.db"
    empty.touch()
    no_tables = tmp_path / "no-tables.db"
    sqlite3.connect(no_tables).execute("VACUUM").connection.close()  # a valid database without tables
    for path in (tmp_path / "absent.db", empty, no_tables):
        with Ledger(path) as ledger:
            assert ledger.entries() == [] and ledger.patch_dir.is_dir()
        assert Ledger(path, read_only=True).version() == 0
    # a ledger made before the marker row existed is recognised by its tables and gets the marker
    db = sqlite3.connect(empty)
    db.execute("DELETE FROM meta WHERE key = 'application'")
    db.commit()
    db.close()
    with Ledger(empty) as ledger:
        assert ledger._meta("application") == "modeledit-ledger"


def test_reading_commands_open_the_ledger_read_only(model_dir, tmp_path, monkeypatch):
    model, tok = fresh(model_dir)
    path = tmp_path / "edits.db"
    with Ledger(path) as ledger:
        entry = ledger.edit(model, tok, request(0), method="ft", hparams={"steps": 2, "lr": 0.05})
    uris: list[str] = []
    connect = sqlite3.connect

    def spy(database, *args, **kwargs):
        uris.append(str(database))
        return connect(database, *args, **kwargs)

    monkeypatch.setattr("modeledit.ledger.sqlite3.connect", spy)
    for args in (["ledger", "list"], ["ledger", "show", entry.id]):
        uris.clear()
        result = runner.invoke(app, [*args, "--db", str(path)])
        assert result.exit_code == 0 and entry.id in result.output, result.output
        assert uris and all("mode=ro" in u for u in uris), uris
    uris.clear()
    result = runner.invoke(app, ["ledger", "export", "--db", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0 and all("mode=ro" in u for u in uris), (result.output, uris)
    reader = Ledger(path, read_only=True)
    assert [e.id for e in reader.entries()] == [entry.id] and reader.patch(entry.id).id == entry.id
    with pytest.raises(LedgerError, match="opened read-only"):
        reader.revert(entry.id)
    assert Ledger(path).get(entry.id).state == "applied"


def _permissions_enforced(folder: Path) -> bool:
    """False for a process that writes into read-only folders anyway (root with CAP_DAC_OVERRIDE)."""
    probe = folder / "probe"
    probe.mkdir(mode=0o555)
    try:
        (probe / "x").touch()
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
    return False


def test_a_ledger_in_a_read_only_folder_can_be_listed(model_dir, tmp_path):
    if not _permissions_enforced(tmp_path):
        pytest.skip("this process ignores file permissions (root)")
    model, tok = fresh(model_dir)
    folder = tmp_path / "ro"
    path = folder / "edits.db"
    with Ledger(path) as ledger:
        entry = ledger.edit(model, tok, request(0), method="ft", hparams={"steps": 2, "lr": 0.05})
    path.chmod(0o444)
    folder.chmod(0o555)
    try:
        for args in (["ledger", "list"], ["ledger", "show", entry.id]):
            result = runner.invoke(app, [*args, "--db", str(path)])
            assert result.exit_code == 0 and entry.id in result.output, result.output
        result = runner.invoke(app, ["ledger", "revert", entry.id, "--db", str(path)])
        output = " ".join(result.output.split())  # rich wraps long lines at the terminal width
        assert result.exit_code == 2 and "for writing (attempt to write a readonly" in output, output
        assert "Traceback" not in result.output
    finally:
        folder.chmod(0o755)
        path.chmod(0o644)


# -- crash safety: real processes, real SIGKILL ------------------------------------------------------------
#
# A "zygote" process imports torch, transformers and modeledit once; each scenario is a fork of it (the zygote
# never ran a parallel torch op, so forking is safe) that replays the ledger, pauses at a chosen point of an
# edit or a revert, and is killed there with SIGKILL. The test process then plays the restart.

ZYGOTE = r"""
import json, os, signal, sys, time, traceback
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed children are reaped by the kernel
import torch
torch.set_num_threads(1)
from modeledit import Ledger, load_model
from modeledit.ledger import Ledger as L
from modeledit.methods.ft import FineTune
load_model(sys.argv[1])  # warms every lazy import in the parent, once

def pause(stage):
    print("at", stage, flush=True)
    time.sleep(300)

def wrap_after(cls, name, when):
    original = getattr(cls, name)
    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        if when(*args, **kwargs):
            pause(job["stage"])
        return out
    setattr(cls, name, wrapper)

def run(job):
    stage = job["stage"]
    model, tok = load_model(sys.argv[1])
    ledger = Ledger(job["db"])
    ledger.sync(model)
    edit = lambda i: ledger.edit(model, tok, job["requests"][i], method="ft", hparams=job["hparams"])
    if stage == "edit-computing":
        original = FineTune.compute_deltas
        FineTune.compute_deltas = lambda self, r: (pause(stage), original(self, r))[1]
    elif stage == "edit-file-written":
        wrap_after(L, "_write_patch", lambda *a, **k: True)
    elif stage in ("edit-in-transaction", "revert-in-transaction"):
        action = "applied" if stage.startswith("edit") else "reverted"
        wrap_after(L, "_log", lambda self, db, edit_id, act, detail=None, audit=None: act == action)
    elif stage == "revert-committed":
        original_sync = L.sync
        L.sync = lambda self, m: (pause(stage), original_sync(self, m))[1]
    if stage == "loop":  # edits and reverts until killed at a random moment; acknowledges each
        for i in range(1000):
            e = edit(i % len(job["requests"]))
            print("applied", e.id, flush=True)
            if i % 2:
                ledger.revert(e.id, model)
                print("reverted", e.id, flush=True)
    elif stage.startswith("edit"):
        e = edit(0)
        print("applied", e.id, flush=True)
        pause("edit-committed")
    else:
        ledger.revert(job["revert_id"], model)
        print("reverted", job["revert_id"], flush=True)
        pause("revert-done")

print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            run(job)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(0)
    print(json.dumps({"pid": pid}), flush=True)
"""


@pytest.fixture(scope="module")
def zygote(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("zygote")
    script = folder / "zygote.py"
    script.write_text(ZYGOTE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SRC))
    with open(folder / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(model_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
    if proc.stdout.readline().strip() != "ready":
        pytest.fail("the zygote process did not start: " + (folder / "stderr.txt").read_text()[-2000:])
    yield proc
    proc.stdin.close()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def seeded_db(model_dir, tmp_path_factory):
    """A ledger with two applied edits (A, B), closed, to be copied per scenario."""
    folder = tmp_path_factory.mktemp("seed")
    model, tok = fresh(model_dir)
    with Ledger(folder / "edits.db") as ledger:
        ids = [ledger.edit(model, tok, request(i), method="ft", hparams=HPARAMS).id for i in range(2)]
    return folder, ids


def run_and_kill(zygote, job: dict, tmp_path: Path, until, deadline: float = 60) -> str:
    """Fork a scenario, wait until its log satisfies ``until``, SIGKILL it; the complete lines it wrote."""
    log = tmp_path / "child.log"
    job = job | {"log": str(log)}
    zygote.stdin.write(json.dumps(job) + "\n")
    zygote.stdin.flush()
    pid = json.loads(zygote.stdout.readline())["pid"]
    end = time.monotonic() + deadline
    text = ""
    while time.monotonic() < end:
        text = log.read_text() if log.exists() else ""
        if until(text) or "Traceback" in text:
            break
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    for _ in range(500):  # wait until the kernel has reaped it (bounded)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.01)
    else:
        pytest.fail(f"process {pid} survived SIGKILL")
    assert "Traceback" not in text, text
    assert until(text), f"the scenario never got there: {text!r}"
    return log.read_text().split("\n")[:-1]


def copy_ledger(seeded_db, tmp_path) -> Path:
    folder, _ = seeded_db
    shutil.copy(folder / "edits.db", tmp_path / "edits.db")
    shutil.copytree(folder / "edits.db.patches", tmp_path / "edits.db.patches")
    return tmp_path / "edits.db"


def check_restart(model_dir, db: Path) -> Ledger:
    """What a restarted process sees: a consistent ledger, and weights equal to the independent replay."""
    ledger = Ledger(db)  # recovery runs here
    assert ledger.verify() == []
    assert not ledger.entries("pending")
    model, _ = fresh(model_dir)
    ledger.sync(model)
    assert weights_digest(model) == independent_digest(model_dir, ledger)
    return ledger


@pytest.mark.parametrize(
    "stage,committed",
    [
        ("edit-computing", False),
        ("edit-file-written", False),
        ("edit-in-transaction", False),
        ("edit-committed", True),
        ("revert-in-transaction", False),
        ("revert-committed", True),
    ],
)
def test_sigkill_mid_edit_or_revert_leaves_a_consistent_ledger(
    zygote, seeded_db, model_dir, tmp_path, stage, committed
):
    _, (a, b) = seeded_db
    db = copy_ledger(seeded_db, tmp_path)
    job = {"stage": stage, "db": str(db), "requests": [request(2)], "hparams": HPARAMS, "revert_id": a}
    run_and_kill(zygote, job, tmp_path, lambda text: f"at {stage}" in text)
    ledger = check_restart(model_dir, db)
    states = {e.id: e.state for e in ledger.entries()}
    if stage.startswith("edit"):
        new = [i for i in states if i not in (a, b)]
        assert len(new) == 1, states  # the intent was recorded in every case
        assert states[new[0]] == ("applied" if committed else "aborted")
        assert states[a] == states[b] == "applied"
    else:
        assert states == {a: "reverted" if committed else "applied", b: "applied"}


def test_sigkill_at_a_random_moment_loses_no_acknowledged_edit(zygote, seeded_db, model_dir, tmp_path):
    _, (a, b) = seeded_db
    db = copy_ledger(seeded_db, tmp_path)
    job = {"stage": "loop", "db": str(db), "requests": [request(i) for i in range(4)], "hparams": HPARAMS}
    random.seed(7)
    delay = random.uniform(0.0, 0.05)

    def after_some_acks(text: str) -> bool:
        if sum(line.startswith(("applied ", "reverted ")) for line in text.split("\n")[:-1]) >= 3:
            time.sleep(delay)
            return True
        return False

    log = run_and_kill(zygote, job, tmp_path, after_some_acks)
    ledger = check_restart(model_dir, db)
    states = {e.id: e.state for e in ledger.entries()}
    acks = [line.split() for line in log if line.startswith(("applied ", "reverted "))]
    assert len(acks) >= 3
    for action, edit_id in acks:
        if action == "applied":
            assert states[edit_id] in ("applied", "reverted")
        else:
            assert states[edit_id] == "reverted"
    assert set(states.values()) <= {"applied", "reverted", "aborted"}
