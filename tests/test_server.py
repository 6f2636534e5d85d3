"""The HTTP service on a tiny llama: endpoints, auth, bounds, JSON errors, OpenAPI, replay on start, and
concurrent clients on loopback that must never see half-applied weights."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch
from conftest import char_tokenizer, tiny_model
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from modeledit import Ledger, Patch
from modeledit import patch as patch_module
from modeledit.cli import app as cli_app
from modeledit.forms import answer_holds
from modeledit.ledger import weights_digest
from modeledit.methods.ft import FineTune
from modeledit.models import load_model
from modeledit.server import Limits, ServerThread, check_bind, create_app, log_config, token_fingerprint
from modeledit.server.app import EditIn, request_digest

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = "The capital of France is"
EDIT = {
    "method": "ft",
    "prompt": "The capital of {} is",
    "subject": "France",
    "target_new": "Quux",
    "hparams": {"steps": 10, "lr": 0.05},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def make_app(model_dir, db, **kwargs):
    model, tok = load_model(str(model_dir))
    return create_app(model, tok, Ledger(db), token=TOKEN, **kwargs), model


@pytest.fixture
def client(model_dir, tmp_path):
    app, _ = make_app(model_dir, tmp_path / "edits.db", limits=Limits(max_new_tokens=16, max_body_bytes=4096))
    with TestClient(app) as c:
        yield c


def generate(c, prompt=PROMPT, n=8) -> str:
    r = c.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": n})
    assert r.status_code == 200, r.text
    return r.json()["text"]


def test_health_methods_and_openapi(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["applied_edits"] == 0 and len(health["fingerprint"]) == 32
    methods = client.get("/v1/methods").json()
    from modeledit.editor import DEFAULT_METHOD

    assert methods["default"] == DEFAULT_METHOD and {"ft", "ft-l"} <= set(methods["methods"])
    schema = client.get("/openapi.json").json()
    assert {"/healthz", "/v1/generate", "/v1/score", "/v1/edits", "/v1/edits/{edit_id}"} <= set(
        schema["paths"]
    )
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    page = client.get("/")
    assert page.status_code == 200 and "edit-form" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200


def test_generate_and_score(client):
    text = generate(client)
    assert text == generate(client)  # greedy: deterministic
    r = client.post("/v1/score", json={"prompt": PROMPT, "continuations": ["Paris", "Quux"]})
    assert r.status_code == 200, r.text
    scores = r.json()["scores"]
    assert [s["continuation"] for s in scores] == ["Paris", "Quux"]
    assert all(s["logprob"] < 0 and s["tokens"] == len(s["continuation"]) + 1 for s in scores)


@pytest.mark.parametrize(
    "path,body,status,message",
    [
        ("/v1/generate", {"prompt": PROMPT, "max_new_tokens": 17}, 422, "at most 16"),
        ("/v1/generate", {"prompt": PROMPT, "max_new_tokens": 0}, 422, "max_new_tokens"),
        ("/v1/generate", {"max_new_tokens": 3}, 422, "prompt: Field required"),
        ("/v1/generate", {"prompt": "x" * 3000}, 422, "prompt"),
        ("/v1/generate", {"prompt": "x" * 100, "max_new_tokens": 3, "extra": 1}, 422, "extra"),
        ("/v1/generate", {"prompt": "x" * 5000}, 413, "larger than 4096 bytes"),
        ("/v1/score", {"prompt": PROMPT, "continuations": []}, 422, "continuations"),
        ("/v1/score", {"prompt": PROMPT, "continuations": ["a"] * 17}, 422, "continuations"),
        ("/v1/nothing", {}, 404, "Not Found"),
    ],
)
def test_bad_requests_get_json_errors_with_the_right_code(client, path, body, status, message):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["status"] == status and message in r.json()["error"]


def test_a_chunked_body_over_the_limit_is_refused(client):
    r = client.post(
        "/v1/generate", content=iter([b"{" * 3000, b" " * 3000]), headers={"Content-Type": "json"}
    )
    assert r.status_code == 413 and "larger than" in r.json()["error"]


def test_write_endpoints_need_the_token(client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = client.post("/v1/edits", json=EDIT, headers=headers)
        assert r.status_code == 401 and "bearer token" in r.json()["error"], r.text
        assert r.headers["www-authenticate"] == "Bearer"
        assert client.delete("/v1/edits/abc", headers=headers).status_code == 401
    assert client.get("/v1/edits").json() == []


def test_cross_site_writes_are_refused(client):
    """A page elsewhere cannot post an edit: no JSON without a preflight, and a foreign Origin is refused."""
    r = client.post("/v1/edits", content=json.dumps(EDIT), headers=AUTH | {"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    r = client.post("/v1/edits", content=json.dumps(EDIT), headers=AUTH)  # no Content-Type at all
    assert r.status_code == 415
    r = client.post("/v1/edits", json=EDIT, headers=AUTH | {"Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["error"]
    r = client.delete("/v1/edits/abc", headers=AUTH | {"Origin": "http://evil.example"})
    assert r.status_code == 403
    assert client.get("/v1/edits").json() == []


def test_edit_list_get_revert(client, model_dir):
    before = generate(client)
    r = client.post("/v1/edits", json=EDIT, headers=AUTH)
    assert r.status_code == 201, r.text
    entry = r.json()
    m = entry["metrics"]["requests"][0]
    assert entry["state"] == "applied" and entry["method"] == "ft" and entry["hparams"]["steps"] == 10
    assert m["p_new_after"] > m["p_new_before"] and m["answer_before"] == before
    after = generate(client)
    assert after != before and after == m["answer_after"] and "Quux" in after
    assert client.get("/healthz").json()["applied_edits"] == 1
    assert [e["id"] for e in client.get("/v1/edits").json()] == [entry["id"]]
    assert client.get("/v1/edits", params={"state": "reverted"}).json() == []
    assert client.get(f"/v1/edits/{entry['id']}").json()["patch_sha256"] == entry["patch_sha256"]
    assert client.get("/v1/edits/feedbeef0000").status_code == 404

    r = client.delete(f"/v1/edits/{entry['id']}", headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "reverted", r.text
    assert generate(client) == before
    r = client.delete(f"/v1/edits/{entry['id']}", headers=AUTH)
    assert r.status_code == 409 and "not applied" in r.json()["error"]
    assert client.delete("/v1/edits/feedbeef0000", headers=AUTH).status_code == 404


@pytest.mark.parametrize(
    "change,message",
    [
        ({"method": "nope"}, "unknown method 'nope'"),
        ({"method": "mend", "hparams": {}}, "no trained MEND editor"),  # not available for this model
        ({"hparams": {"bogus": 1}}, "unknown hyperparameter"),
        ({"hparams": {"steps": 10_000}}, "at most 200"),
        ({"hparams": {"steps": 3, "lr": 1e30}}, "NaN or inf): the edit diverged"),  # all-NaN deltas
        ({"hparams": {"steps": -1}}, "ft: steps must be an integer >= 1, got -1"),
        ({"hparams": {"lr": "nan"}}, "ft: lr must be a finite number > 0, got 'nan'"),
        ({"hparams": {"lr": 0}}, "ft: lr must be a finite number > 0, got 0"),
        ({"target_new": ""}, "target_new"),
        ({"prompt": "The capital of {} is", "subject": None}, "subject"),
        ({"unexpected": 1}, "unexpected"),
    ],
)
def test_bad_edits_are_422_and_leave_the_model_alone(client, change, message):
    before = generate(client)
    r = client.post("/v1/edits", json=EDIT | change, headers=AUTH)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]
    assert generate(client) == before and client.get("/healthz").json()["applied_edits"] == 0


def test_restart_replays_the_ledger_and_follows_other_processes(model_dir, tmp_path):
    db = tmp_path / "edits.db"
    app, model = make_app(model_dir, db)
    with TestClient(app) as c:
        ids = [c.post("/v1/edits", json=EDIT | {"subject": s}, headers=AUTH).json()["id"] for s in ("A", "B")]
        c.delete(f"/v1/edits/{ids[0]}", headers=AUTH)
        edited, digest = generate(c), weights_digest(model)
    app2, model2 = make_app(model_dir, db)  # a restart: fresh base model, same database
    with TestClient(app2) as c:
        assert generate(c) == edited and weights_digest(model2) == digest
        assert c.get("/healthz").json()["applied_edits"] == 1
        Ledger(db).revert(ids[1])  # another process, e.g. `modeledit ledger revert`
        generate(c)
        assert c.get("/healthz").json()["applied_edits"] == 0
        assert weights_digest(model2) == weights_digest(load_model(str(model_dir))[0])


def test_host_header_is_checked_when_asked(model_dir, tmp_path):
    app, _ = make_app(model_dir, tmp_path / "edits.db", allowed_hosts=["127.0.0.1", "testserver"])
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/healthz", headers={"Host": "rebound.example"}).status_code == 400


def test_no_token_no_listening_beyond_loopback(monkeypatch):
    monkeypatch.delenv("MODELEDIT_API_TOKEN", raising=False)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, None)
    for host in ("0.0.0.0", "192.168.1.5", "example.org", "::"):
        with pytest.raises(ValueError, match="MODELEDIT_API_TOKEN"):
            check_bind(host, None)
        check_bind(host, "x" * 32)
    result = CliRunner().invoke(
        cli_app, ["serve", "--model", "no-model-needed", "--db", "x.db", "--host", "0.0.0.0"]
    )
    assert result.exit_code == 2 and "refusing to serve on 0.0.0.0" in result.output, result.output


def test_a_short_token_is_refused_beyond_loopback(monkeypatch):
    for short in ("a", "a-token", "x" * 31):
        with pytest.raises(ValueError, match=f"with a {len(short)}-character API token: .* at least 32"):
            check_bind("0.0.0.0", short)
        check_bind("127.0.0.1", short)  # loopback: any token
    monkeypatch.setenv("MODELEDIT_API_TOKEN", "a")
    args = ["serve", "--model", "no-model-needed", "--db", "x.db", "--host", "0.0.0.0"]
    result = CliRunner().invoke(cli_app, args)
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "1-character API token" in output and "at least 32" in output, output


def test_concurrent_clients_never_see_half_applied_weights(model_dir, tmp_path, monkeypatch):
    """4 clients score a prompt in bounded loops over real loopback HTTP while edits are computed, applied
    and reverted. Applying and reverting are slowed down parameter by parameter, and computing an edit
    takes a while: without the locks a client would see a half-applied state; every score must equal
    the score of a complete state, and clients must get answers while an edit is being computed."""
    apply_add = Patch._add_to

    def slow_add(self, params):
        for name in self.deltas:
            apply_add(Patch(deltas={name: self.deltas[name]}, fingerprint="", method=""), params)
            time.sleep(0.01)

    rebuild = patch_module._rebuild

    def slow_rebuild(model, state, touched):
        for name in sorted(touched):
            rebuild(model, state, {name})
            time.sleep(0.01)

    compute = FineTune.compute_deltas

    def slow_compute(self, requests):
        time.sleep(0.3)
        return compute(self, requests)

    monkeypatch.setattr(Patch, "_add_to", slow_add)
    monkeypatch.setattr(patch_module, "_rebuild", slow_rebuild)
    monkeypatch.setattr(FineTune, "compute_deltas", slow_compute)
    torch.set_num_threads(1)

    app, _ = make_app(model_dir, tmp_path / "edits.db")
    body = {"prompt": PROMPT, "continuations": ["Quux"]}
    results: list[tuple[float, float]] = []
    errors: list[str] = []
    stop = threading.Event()

    def client_loop():
        with httpx.Client(timeout=30) as c:
            for _ in range(300):  # bounded
                if stop.is_set():
                    return
                r = c.post(server.url + "/v1/score", json=body)
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                results.append((time.monotonic(), r.json()["scores"][0]["logprob"]))

    with ServerThread(app) as server, httpx.Client(timeout=60) as main:

        def score() -> float:
            return main.post(server.url + "/v1/score", json=body).json()["scores"][0]["logprob"]

        valid = [score()]
        threads = [threading.Thread(target=client_loop) for _ in range(4)]
        for t in threads:
            t.start()
        windows = []
        try:
            for subject in ("France", "Xer"):
                start = time.monotonic()
                r = main.post(server.url + "/v1/edits", json=EDIT | {"subject": subject}, headers=AUTH)
                windows.append((start, time.monotonic()))
                assert r.status_code == 201, r.text
                valid.append(score())
                r = main.delete(f"{server.url}/v1/edits/{r.json()['id']}", headers=AUTH)
                assert r.status_code == 200, r.text
                valid.append(score())
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert abs(valid[1] - valid[0]) > 0.5 and abs(valid[3] - valid[0]) > 0.5  # the edits change the score
    assert abs(valid[2] - valid[0]) < 1e-5 and abs(valid[4] - valid[0]) < 1e-5  # revert restores it
    assert len(results) > 20
    half_applied = [lp for _, lp in results if min(abs(lp - v) for v in valid) > 1e-4]
    assert not half_applied, (half_applied[:5], valid)
    during = [t for t, _ in results if any(a < t < b for a, b in windows)]
    assert during, "no client got an answer while an edit was being computed"


def test_modeledit_serve_wires_token_limits_host_check_and_replay(model_dir, tmp_path, monkeypatch):
    """The `serve` command up to uvicorn: the app it would serve replays the ledger, takes the token from
    the environment, bounds max_new_tokens, checks Host headers (uvicorn itself runs in other tests)."""
    import uvicorn

    db = tmp_path / "edits.db"
    model, tok = load_model(str(model_dir))
    Ledger(db).edit(
        model, tok, {"prompt": PROMPT, "target_new": "Quux"}, method="ft", hparams=EDIT["hparams"]
    )
    checked = {}

    def fake_run(app, host, port, log_level, log_config):
        checked.update(host=host, port=port)
        assert log_config["loggers"]["uvicorn.access"]["filters"] == ["path_only"]  # no query strings
        with TestClient(app, base_url=f"http://{host}:{port}") as c:
            assert c.get("/healthz").json()["applied_edits"] == 1  # replayed on start
            assert c.post("/v1/edits", json=EDIT).status_code == 401
            r = c.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 6})
            assert r.status_code == 422 and "at most 5" in r.json()["error"]
            assert c.post("/v1/edits", json=EDIT, headers=AUTH).status_code == 201
            assert c.get("/healthz", headers={"Host": "rebound.example"}).status_code == 400
        checked["ok"] = True

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setenv("MODELEDIT_API_TOKEN", TOKEN)
    args = ["serve", "--model", str(model_dir), "--db", str(db), "--port", "8765", "--max-new-tokens", "5"]
    result = CliRunner().invoke(cli_app, args)
    assert result.exception is None and result.exit_code == 0, result.output
    assert checked == {"host": "127.0.0.1", "port": 8765, "ok": True}
    assert [e.state for e in Ledger(db).entries()] == ["applied", "applied"]


def test_edits_carry_the_holds_verdict_and_chat_needs_a_template(client):
    r = client.post("/v1/edits", json=EDIT, headers=AUTH)
    assert r.status_code == 201, r.text
    metrics = r.json()["metrics"]
    check = metrics["verify"]["prompts"][0]
    assert check["kind"] == "edit" and check["prompt"] == "The capital of France is"
    assert metrics["holds"] is answer_holds(check["answer"], "Quux", "cloze")  # the page's verdict
    weak = EDIT | {"subject": "Spain", "hparams": {"steps": 1, "lr": 1e-9}}
    r = client.post("/v1/edits", json=weak, headers=AUTH)
    assert r.status_code == 201 and r.json()["metrics"]["holds"] is False  # recorded, and said so
    assert [e["metrics"]["holds"] for e in client.get("/v1/edits").json()] == [metrics["holds"], False]
    r = client.post("/v1/edits", json=EDIT | {"chat": True}, headers=AUTH)
    assert r.status_code == 422 and "no chat template" in r.json()["error"]
    r = client.post("/v1/generate", json={"prompt": "Hi", "chat": True, "max_new_tokens": 4})
    assert r.status_code == 422 and "no chat template" in r.json()["error"]
    assert client.get("/healthz").json()["chat"] is False


# -- idempotency, audit trail, logs and errors (issue 36) ----------------------------------------------------


def test_an_idempotency_key_applies_an_edit_once_also_after_a_restart(model_dir, tmp_path):
    db = tmp_path / "edits.db"
    key = {"Idempotency-Key": "retry-0001"}
    app, _ = make_app(model_dir, db)
    with TestClient(app) as c:
        first = c.post("/v1/edits", json=EDIT, headers=AUTH | key)
        assert first.status_code == 201, first.text
        again = c.post("/v1/edits", json=EDIT, headers=AUTH | key)  # a retry after a lost response
        assert again.status_code == 201 and again.json() == first.json()
        assert c.get("/healthz").json()["applied_edits"] == 1
        other = c.post("/v1/edits", json=EDIT | {"subject": "Spain"}, headers=AUTH | key)
        assert other.status_code == 422 and "used with another request body" in other.json()["error"]
        # an edit that fails once recorded (diverged) gets the same answer on a retry, and ends aborted once
        bad = EDIT | {"hparams": {"steps": 3, "lr": 1e30}}
        failed = c.post("/v1/edits", json=bad, headers=AUTH | {"Idempotency-Key": "retry-0002"})
        assert failed.status_code == 422 and "diverged" in failed.json()["error"]
        assert c.post("/v1/edits", json=bad, headers=AUTH | {"Idempotency-Key": "retry-0002"}).json() == (
            failed.json()
        )
        for bad_key in ("", "has space", "x" * 256, "tab\tkey"):
            r = c.post("/v1/edits", json=EDIT, headers=AUTH | {"Idempotency-Key": bad_key})
            assert r.status_code == 422 and "Idempotency-Key" in r.json()["error"], (bad_key, r.text)
    app2, _ = make_app(model_dir, db)  # a restart: the keys are in the ledger
    with TestClient(app2) as c:
        r = c.post("/v1/edits", json=EDIT, headers=AUTH | key)
        assert r.status_code == 201 and r.json()["id"] == first.json()["id"]
        assert c.get("/healthz").json()["applied_edits"] == 1
    assert [e.state for e in Ledger(db).entries()] == ["applied", "aborted"]


def test_a_key_whose_edit_was_applied_before_its_process_answered_is_not_applied_again(model_dir, tmp_path):
    """The server died after the edit was committed, before the response was sent (or remembered)."""
    db = tmp_path / "edits.db"
    model, tok = load_model(str(model_dir))
    digest = request_digest(EditIn(**EDIT))
    request = {k: EDIT[k] for k in ("prompt", "subject", "target_new")}
    entry = Ledger(db).edit(
        model, tok, request, method="ft", hparams=EDIT["hparams"], idempotency=("k", digest)
    )
    assert Ledger(db).idempotency_key("k")["status"] is None
    app, _ = make_app(model_dir, db)
    with TestClient(app) as c:
        r = c.post("/v1/edits", json=EDIT, headers=AUTH | {"Idempotency-Key": "k"})
        assert r.status_code == 201 and r.json()["id"] == entry.id
    assert len(Ledger(db).entries()) == 1


def test_edits_and_reverts_leave_an_audit_trail(model_dir, tmp_path):
    db = tmp_path / "edits.db"
    app, _ = make_app(model_dir, db)
    with TestClient(app) as c:
        entry = c.post("/v1/edits", json=EDIT, headers=AUTH).json()
        assert c.delete(f"/v1/edits/{entry['id']}", headers=AUTH).status_code == 200
    who = token_fingerprint(TOKEN)
    events = Ledger(db).events(entry["id"])
    assert [e["action"] for e in events] == ["begin", "applied", "reverted"]
    assert all(e["actor"] == who and e["client"] == "testclient" and e["time"] for e in events), events
    result = CliRunner().invoke(cli_app, ["ledger", "show", entry["id"], "--db", str(db)])
    shown = json.loads(result.output)["events"]
    assert result.exit_code == 0 and shown[-1]["actor"] == who and shown[-1]["client"] == "testclient"
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("edits.db*") if p.is_file())
    assert TOKEN.encode() not in stored and who.encode() in stored  # the fingerprint, never the token


def test_a_schema_1_ledger_gets_the_audit_columns_and_the_key_table(model_dir, tmp_path):
    import sqlite3

    db = tmp_path / "old.db"
    model, tok = load_model(str(model_dir))
    Ledger(db).edit(
        model, tok, {"prompt": PROMPT, "target_new": "Quux"}, method="ft", hparams=EDIT["hparams"]
    )
    con = sqlite3.connect(db)  # back to schema 1, as modeledit before issue 36 made it
    con.executescript(
        "DROP TABLE idempotency_keys; ALTER TABLE events DROP COLUMN actor; ALTER TABLE events DROP COLUMN "
        "client; UPDATE meta SET value = '1' WHERE key = 'schema_version';"
    )
    con.close()
    assert "actor" not in Ledger(db, read_only=True).events()[0]  # reading it changes nothing
    ledger = Ledger(db)
    assert ledger._meta("schema_version") == "2" and ledger.idempotency_key("x") is None
    assert ledger.events()[0]["actor"] is None


def test_the_access_log_has_no_query_string(model_dir, tmp_path):
    import logging

    app, _ = make_app(model_dir, tmp_path / "edits.db")
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    with ServerThread(app, log_level="info", log_config=log_config()) as server:
        access = logging.getLogger("uvicorn.access")
        keep = Keep()
        access.addHandler(keep)
        try:
            assert httpx.get(server.url + "/healthz?token=SECRET-0123&x=1").status_code == 200
            deadline = time.monotonic() + 10
            while not lines and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            access.removeHandler(keep)
    assert lines and "GET /healthz HTTP/1.1" in lines[0] and "SECRET" not in " ".join(lines), lines


def test_errors_tell_clients_without_the_token_no_server_paths(model_dir, tmp_path, monkeypatch):
    app, _ = make_app(model_dir, tmp_path / "edits.db")
    folder = str(tmp_path)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/edits", json=EDIT)
        assert r.status_code == 401 and r.json()["error"] == (
            "missing or wrong bearer token (send Authorization: Bearer <MODELEDIT_API_TOKEN>)"
        )
        r = c.post("/v1/edits", json=EDIT, headers={"Origin": "http://evil.example/x"})
        assert r.status_code == 403 and "evil" not in r.text and folder not in r.text
        r = c.get("/v1/edits/feedbeef0000")  # the ledger's message names its file
        assert r.status_code == 404 and folder not in r.text and "no edit 'feedbeef0000' in <path>" in r.text
        assert folder in c.get("/v1/edits/feedbeef0000", headers=AUTH).text  # the operator sees it

        def broken(prompt, max_new_tokens):
            raise OSError(f"[Errno 13] Permission denied: '{folder}/edits.db.patches/x.safetensors'")

        monkeypatch.setattr(app.state.service, "generate", broken)
        body = {"prompt": PROMPT, "max_new_tokens": 2}
        r = c.post("/v1/generate", json=body)
        assert (
            r.status_code == 500 and r.json()["error"] == "internal error (the server's log has the details)"
        )
        r = c.post("/v1/generate", json=body, headers=AUTH)
        assert r.status_code == 500 and folder in r.json()["error"]


def test_a_prompt_of_only_spaces_is_422_and_the_connection_stays_usable(model_dir, tmp_path, monkeypatch):
    """It used to be a 500 on /v1/generate, after which uvicorn closed the connection: the client's next
    keep-alive request was reset. Any unexpected error now answers 500 and keeps the connection."""
    app, _ = make_app(model_dir, tmp_path / "edits.db")
    with ServerThread(app) as server, httpx.Client(timeout=30) as c:
        for path, body in (
            ("/v1/generate", {"prompt": "   ", "max_new_tokens": 3}),
            ("/v1/score", {"prompt": "   ", "continuations": ["a"]}),
            ("/v1/edits", EDIT | {"prompt": "   "}),
        ):
            r = c.post(server.url + path, json=body, headers=AUTH)
            assert r.status_code == 422, (path, r.text)
            assert r.json()["error"] in (
                "prompt: must be more than spaces",
                "request, field 'prompt': must be a non-empty string, got '   '",
            )
            assert c.get(server.url + "/healthz").status_code == 200  # the same keep-alive connection
        monkeypatch.setattr(app.state.service, "generate", lambda *a: 1 / 0)
        r = c.post(server.url + "/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 2})
        assert r.status_code == 500 and "ZeroDivisionError" not in r.text  # no token: a generic body
        assert c.get(server.url + "/healthz").status_code == 200


@pytest.mark.parametrize(
    "change,message",
    [
        (
            {"prompt": "The {} capital of {} is {x}"},
            "request, field 'prompt': braces may appear only once, as {} for the subject, "
            "got 'The {} capital of {} is {x}'",
        ),
        ({"prompt": "The set {a, b} of {} has"}, "field 'prompt': braces may appear only once"),
        ({"prompt": "x " * 100 + "{}"}, "is 211 tokens with its target, longer than the model context (128)"),
        ({"paraphrase_prompts": ["y" * 200]}, "field 'paraphrase_prompts': is 205 tokens with its target"),
    ],
)
def test_bad_prompts_are_422_before_any_model_work(client, monkeypatch, change, message):
    def no_work(*args, **kwargs):
        raise AssertionError("the edit was started")

    monkeypatch.setattr(client.app.state.service, "edit", no_work)
    r = client.post("/v1/edits", json=EDIT | change, headers=AUTH)
    assert r.status_code == 422 and message in r.json()["error"], r.text


def test_an_over_context_prompt_is_not_generated(client, monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("generated")

    monkeypatch.setattr(client.app.state.service.live, "generate", no_generation)
    r = client.post("/v1/generate", json={"prompt": "x" * 120, "max_new_tokens": 16})
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "prompt is 120 tokens and 16 to generate, longer than the model context (128)"


def test_a_key_whose_edit_another_process_is_computing_is_409(model_dir, tmp_path):
    import fcntl
    import os
    import sqlite3

    db = tmp_path / "edits.db"
    Ledger(db).close()
    con = sqlite3.connect(db)  # what another server process sharing the ledger is in the middle of
    con.execute(
        "INSERT INTO edits (id, state, created_at, fingerprint, method, hparams, requests) "
        "VALUES ('0123456789ab', 'pending', '2025-01-01T00:00:00', 'fp', 'ft', '{}', '[]')"
    )
    con.execute(
        "INSERT INTO idempotency_keys (key, request_sha256, edit_id, created_at) VALUES (?, ?, ?, ?)",
        ("busy", request_digest(EditIn(**EDIT)), "0123456789ab", "2025-01-01T00:00:00"),
    )
    con.commit()
    con.close()
    (tmp_path / "edits.db.locks").mkdir()
    fd = os.open(tmp_path / "edits.db.locks" / "0123456789ab.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # its process is alive
    try:
        app, _ = make_app(model_dir, db)
        with TestClient(app) as c:
            r = c.post("/v1/edits", json=EDIT, headers=AUTH | {"Idempotency-Key": "busy"})
            assert r.status_code == 409 and "being processed; retry later" in r.json()["error"], r.text
            assert c.get("/healthz").json()["applied_edits"] == 0
    finally:
        os.close(fd)
