"""The HTTP service: generation, scoring, and edits recorded in a ledger, behind a bearer token.

Concurrency: generation and scoring read the *live* model under the read side of a readers-writer lock.
Edits are computed on a *shadow* copy of the model (editors swap parameters functionally while they
compute, which other threads must never see), serialised by one edit lock; the finished patch is then
applied to the live model under the write side of the lock, so a generation sees the weights either
entirely before or entirely after an edit, and generations keep running while an edit is computed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from torch import nn

from ..arch import ArchitectureError
from ..editor import DEFAULT_METHOD, EDITORS, available_methods, resolve_method
from ..forms import FormError, has_chat_template, render_chat
from ..ledger import Audit, EditStateError, Entry, IdempotencyKeyError, Ledger, LedgerError, UnknownEditError
from ..lm import is_seq2seq, target_batch, token_logprobs
from ..models import fingerprint
from ..patch import PatchError, applied_patches, revert_all
from ..requests import EditRequest, EditRequestError, check_for_model, check_length

STATIC = Path(__file__).parent / "static"
TOKEN_ENV = "MODELEDIT_API_TOKEN"
MAX_PROMPT_CHARS = 2000
MAX_TARGET_CHARS = 200
MAX_CONTINUATIONS = 16
MAX_PARAPHRASES = 8
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
MIN_TOKEN_CHARS = 32  # for a bind beyond loopback
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # visible ASCII
# An absolute path in an error message (POSIX, ~/ or a Windows drive), not the '/' inside a word.
PATH_IN_TEXT = re.compile(r"(?<![\w/.<>-])(?:~?/|[A-Za-z]:[\\/])[^\s'\"(),;]+")


@dataclass
class Limits:
    """Bounds on what one request may ask for."""

    max_body_bytes: int = 64 * 1024  # larger request bodies get 413
    max_new_tokens: int = 128  # per /v1/generate request
    max_edit_steps: int = 200  # the "steps" hyperparameter of an edit
    answer_tokens: int = 8  # greedy answer recorded before/after an edit


# -- binding -------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve anywhere


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token of at least ``MIN_TOKEN_CHARS`` characters."""
    if is_loopback(host):
        return
    if not token:
        raise ValueError(
            f"refusing to serve on {host} without an API token: set {TOKEN_ENV} (a long random string), "
            "or bind to 127.0.0.1"
        )
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"refusing to serve on {host} with a {len(token)}-character API token: beyond loopback "
            f"{TOKEN_ENV} needs at least {MIN_TOKEN_CHARS} characters "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )


def token_fingerprint(token: str) -> str:
    """How the ledger names a token's holder: a hash prefix, never the token."""
    return "token:" + hashlib.sha256(b"modeledit-token:" + token.encode()).hexdigest()[:16]


def request_digest(body: BaseModel) -> str:
    """SHA-256 of a request body as parsed (defaults filled in, keys sorted): what a retry must repeat."""
    return hashlib.sha256(json.dumps(body.model_dump(), sort_keys=True, default=str).encode()).hexdigest()


# -- locks ---------------------------------------------------------------------------------------------------


class RWLock:
    """Many readers or one writer; a waiting writer holds back new readers (no writer starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# -- the service ---------------------------------------------------------------------------------------------


class Service:
    """The model, its shadow for computing edits, the ledger, and the locks between them."""

    def __init__(self, model: nn.Module, tokenizer, ledger: Ledger, limits: Limits):
        self.ledger, self.limits = ledger, limits
        self.live, self.tokenizer = model, tokenizer
        revert_all(model)  # the ledger is the truth: weights = base + its applied edits
        self.shadow = copy.deepcopy(model)
        self.shadow_tokenizer = copy.deepcopy(tokenizer)  # fast tokenizers are not safe across threads
        self.rw = RWLock()
        self.edit_lock = threading.RLock()  # re-entered by ``once`` around ``edit``
        self.tok_lock = threading.Lock()
        self.synced_version = -1
        self.seq2seq = is_seq2seq(model)
        config = model.config
        self.context = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        with self.edit_lock:
            self._sync()  # replay the ledger

    def _sync(self) -> None:
        """With the edit lock held: bring the shadow and then the live model to the ledger's state."""
        version = self.ledger.version()
        self.ledger.sync(self.shadow)
        want = [p.id for p in applied_patches(self.shadow)]
        if [p.id for p in applied_patches(self.live)] != want:
            with self.rw.write():
                self.ledger.sync(self.live)
        self.synced_version = version

    def refresh(self) -> None:
        """Pick up changes another process made to the ledger (``modeledit ledger revert``), if idle."""
        if self.ledger.version() != self.synced_version and self.edit_lock.acquire(blocking=False):
            try:
                self._sync()
            finally:
                self.edit_lock.release()

    def applied(self) -> int:
        return len(applied_patches(self.live))

    def generate(self, prompt: str, max_new_tokens: int) -> str:
        self.refresh()
        with self.tok_lock:
            enc = self.tokenizer(prompt.rstrip(" "), return_tensors="pt")
        n = enc["input_ids"].shape[1]
        if n == 0:
            raise HTTPException(422, "prompt: no tokens to continue (it is only spaces)")
        if not self.seq2seq:
            try:
                with self.tok_lock:  # the one length check of the CLI, the ledger and the editors
                    check_length(
                        self.tokenizer, prompt, self.context, "prompt", f"and {max_new_tokens} to generate",
                        reserve=max_new_tokens,
                    )  # fmt: skip
            except EditRequestError as e:
                raise HTTPException(422, str(e)) from None
        with self.rw.read(), torch.no_grad():
            out = self.live.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new = out[0] if self.seq2seq else out[0, n:]
        with self.tok_lock:
            return self.tokenizer.decode(new, skip_special_tokens=True)

    def score(self, prompt: str, continuations: list[str]) -> list[dict]:
        self.refresh()
        with self.tok_lock:
            batch = target_batch(self.tokenizer, [prompt] * len(continuations), continuations, self.seq2seq)
        if self.context and batch["input_ids"].shape[1] > self.context:
            raise HTTPException(422, f"prompt and continuation exceed the model context ({self.context})")
        with self.rw.read(), torch.no_grad():
            logp, mask = token_logprobs(self.live, batch)
        sums, counts = logp.sum(-1), mask.sum(-1)
        return [
            {
                "continuation": c,
                "logprob": float(s),
                "tokens": int(k),
                "mean_logprob": float(s / max(int(k), 1)),
            }
            for c, s, k in zip(continuations, sums, counts)
        ]

    def check(self, request: EditRequest) -> None:
        """The request's fields and lengths, before an edit is queued behind the edit lock."""
        with self.tok_lock:
            check_for_model([request], self.live, self.tokenizer)

    def edit(
        self,
        request: EditRequest,
        method: str,
        hparams: dict[str, Any],
        verify: bool = True,
        audit: Audit | None = None,
        idempotency: tuple[str, str] | None = None,
    ) -> Entry:
        with self.edit_lock:
            self._sync()
            entry = self.ledger.edit(
                self.shadow,
                self.shadow_tokenizer,
                [request],
                method=method,
                hparams=hparams,
                answer_tokens=self.limits.answer_tokens,
                verify=verify,
                audit=audit,
                idempotency=idempotency,
            )
            self._sync()
            return entry

    def revert(self, edit_id: str, audit: Audit | None = None) -> Entry:
        with self.edit_lock:
            entry = self.ledger.revert(edit_id, audit=audit)
            self._sync()
            return entry

    def once(self, key: str, digest: str, compute: Callable[[], tuple[int, dict]]) -> tuple[int, dict]:
        """(status, body) of the first request with this Idempotency-Key; ``compute`` runs only for a new
        key. The key is recorded in the ledger with the edit's intent (``Ledger.edit(idempotency=...)``), so
        a retry after a lost response or a restart finds it and nothing is applied twice."""
        with self.edit_lock:
            record = self.ledger.idempotency_key(key)
            if record is not None:
                if record["request_sha256"] != digest:
                    message = "Idempotency-Key was used with another request body: use a new key"
                    return 422, _body(422, message)
                if record["status"] is not None:
                    return record["status"], record["response"]
                entry = self.ledger.get(record["edit_id"])
                if entry.state == "pending":  # another process is computing it
                    message = "a request with this Idempotency-Key is being processed; retry later"
                    return 409, _body(409, message)
                if entry.state != "aborted":  # applied, and its process ended before it answered
                    return 201, entry.to_dict()
                # aborted with no answer: its process died, nothing was applied; the key may be used again
                self.ledger.forget_key(key)
            status, body = compute()
            record = self.ledger.idempotency_key(key)
            if record is not None and record["status"] is None and status in (201, 422):
                own = status == 422 or body.get("id") == record["edit_id"]
                if own and self.ledger.get(record["edit_id"]).state != "pending":
                    self.ledger.remember_response(key, status, body)
            return status, body


# -- API schemas ---------------------------------------------------------------------------------------------


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int = Field(20, ge=1, description="at most the server's limit (default 128)")
    chat: bool = Field(False, description="ask the prompt as a user turn in the model's chat template")


class GenerateOut(BaseModel):
    prompt: str
    text: str
    max_new_tokens: int
    applied_edits: int


class ScoreIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    continuations: list[str] = Field(min_length=1, max_length=MAX_CONTINUATIONS)


class ScoreItem(BaseModel):
    continuation: str
    logprob: float = Field(description="sum of the continuation tokens' log-probabilities (natural log)")
    tokens: int
    mean_logprob: float


class ScoreOut(BaseModel):
    prompt: str
    scores: list[ScoreItem]


class EditIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = Field(
        "default", description=f"a registered editing method (GET /v1/methods); default: {DEFAULT_METHOD}"
    )
    prompt: str = Field(
        min_length=1, max_length=MAX_PROMPT_CHARS, description="full prompt, or {} for the subject"
    )
    subject: str | None = Field(None, max_length=MAX_TARGET_CHARS)
    target_new: str = Field(min_length=1, max_length=MAX_TARGET_CHARS)
    target_true: str | None = Field(None, max_length=MAX_TARGET_CHARS)
    paraphrase_prompts: list[str] = Field(default_factory=list, max_length=MAX_PARAPHRASES)
    chat: bool = Field(False, description="the prompt is a user turn in the model's chat template")
    system: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="chat: a system prompt")
    verify: bool = Field(True, description="check in generation that the edit holds (metrics.holds)")
    hparams: dict[str, Any] = Field(default_factory=dict, description="hyperparameter overrides")


class EntryOut(BaseModel):
    id: str
    seq: int
    state: str = Field(description="pending | applied | reverted | aborted")
    created_at: str
    applied_at: str | None = None
    reverted_at: str | None = None
    fingerprint: str
    method: str
    hparams: dict[str, Any]
    requests: list[dict[str, Any]]
    metrics: dict[str, Any] | None = Field(
        None,
        description="seconds; holds and verify (the check in generation); per request p_new/p_true/answer "
        "_before and _after",
    )
    patch_file: str | None = None
    patch_sha256: str | None = None
    patch_bytes: int | None = None
    error: str | None = None


class ErrorOut(BaseModel):
    error: str
    status: int


class HealthOut(BaseModel):
    status: str
    model: str
    fingerprint: str
    applied_edits: int
    chat: bool = Field(False, description="the model has a chat template (chat-form edits and questions)")


class MethodsOut(BaseModel):
    methods: list[str]
    default: str
    hparams: dict[str, dict[str, Any]]


ERRORS = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 413, 415, 422)}


# -- middleware and errors -----------------------------------------------------------------------------------


class CatchAll:
    """An unexpected error becomes a JSON 500 here, and is logged, instead of reaching the server: uvicorn
    closes the connection of a request that raised, and the client's next keep-alive request is reset."""

    def __init__(self, app, respond: Callable[[Request, Exception], JSONResponse]):
        self.app, self.respond = app, respond

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:  # half a response is out: only closing the connection is left
                raise
            logging.getLogger("uvicorn.error").exception("error in %s %s", scope["method"], scope["path"])
            await self.respond(Request(scope), exc)(scope, receive, send)


class BodyLimit:
    """Reject request bodies over ``max_bytes`` with 413 (by Content-Length, or while reading them)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = _error(413, f"request body larger than {self.max_bytes} bytes")
        await response(scope, receive, send)


def _body(status: int, message: str) -> dict:
    return {"error": message, "status": status}


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(_body(status, message), status_code=status, headers=headers)


def _client(request: Request) -> str | None:
    """The client's address as the socket saw it (a forwarding header would be the client's word)."""
    return request.client.host if request.client else None


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


# -- the app -------------------------------------------------------------------------------------------------


def create_app(
    model: nn.Module,
    tokenizer,
    ledger: Ledger,
    token: str | None = None,
    limits: Limits | None = None,
    allowed_hosts: list[str] | None = None,
) -> FastAPI:
    """The FastAPI app. Replays the ledger onto ``model`` (the base model) first.

    ``token``: the bearer token write endpoints require (None: writes are open; only for loopback).
    ``allowed_hosts``: accepted Host headers (against DNS rebinding on loopback); None accepts any.
    """
    limits = limits or Limits()
    service = Service(model, tokenizer, ledger, limits)
    model_name = str(getattr(model, "name_or_path", "") or type(model).__name__)
    app = FastAPI(
        title="modeledit",
        version="1",
        description="Edit a language model's facts with reversible patches recorded in a ledger. "
        "Write endpoints need `Authorization: Bearer <MODELEDIT_API_TOKEN>`.",
    )
    app.state.service, app.state.token, app.state.limits = service, token, limits
    bearer = HTTPBearer(auto_error=False, description=f"the token in ${TOKEN_ENV}")

    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(
                401,
                "missing or wrong bearer token (send Authorization: Bearer <MODELEDIT_API_TOKEN>)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def has_token(request: Request) -> bool:
        """The request carries the valid token (every request does where none is set: loopback only)."""
        if token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    def audit(request: Request) -> Audit:
        return Audit(actor=token_fingerprint(token) if token else "anonymous", client=_client(request))

    def public(request: Request, status: int, message: str) -> str:
        """What an error may tell this client: without the token, nothing about the server's files."""
        if has_token(request):
            return message
        if status >= 500:
            return "internal error (the server's log has the details)"
        return PATH_IN_TEXT.sub("<path>", message)

    def same_origin_json(request: Request) -> None:
        """Writes from a browser must come from this page: cross-site requests get no way in (CSRF).

        A JSON content type cannot be sent cross-site without a CORS preflight, which this server never
        grants; an Origin header, when a browser sends one, must name this server.
        """
        origin = request.headers.get("origin")
        if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host", ""):
            raise HTTPException(403, "cross-origin write refused (the Origin header names another site)")
        if request.method == "POST":
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/json":
                raise HTTPException(415, "send the body as JSON with Content-Type: application/json")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = public(request, exc.status_code, str(exc.detail))
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error(422, public(request, 422, _validation_message(exc)))

    def internal(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, public(request, 500, f"internal error: {type(exc).__name__}: {exc}"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return internal(request, exc)

    # innermost first: CatchAll sees the routes' errors, BodyLimit and the Host check every request
    app.add_middleware(CatchAll, respond=internal)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    # -- pages and health ---------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(
            STATIC / "index.html",
            headers={
                "Content-Security-Policy": "default-src 'self'; base-uri 'none'; frame-ancestors 'none'; "
                "form-action 'none'",
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-store",
            },
        )

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", response_model=HealthOut)
    def healthz():
        return HealthOut(
            status="ok",
            model=model_name,
            fingerprint=fingerprint(model),
            applied_edits=service.applied(),
            chat=has_chat_template(service.tokenizer),
        )

    @app.get("/v1/methods", response_model=MethodsOut)
    def methods():
        names = available_methods()
        hparams = {}
        for name in names:
            fields = dataclasses.fields(EDITORS[name].Config)
            hparams[name] = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
        return MethodsOut(methods=names, default=DEFAULT_METHOD, hparams=hparams)

    # -- reading the model --------------------------------------------------------------------------------
    @app.post("/v1/generate", response_model=GenerateOut, responses=ERRORS)
    def generate(body: GenerateIn):
        """Greedy continuation of the prompt by the model with every applied edit."""
        if not body.prompt.strip():
            raise HTTPException(422, "prompt: must be more than spaces")
        if body.max_new_tokens > limits.max_new_tokens:
            raise HTTPException(422, f"max_new_tokens: at most {limits.max_new_tokens}")
        prompt = body.prompt
        if body.chat:
            try:
                prompt = render_chat(service.tokenizer, body.prompt)
            except FormError as e:
                raise HTTPException(422, str(e)) from None
        text = service.generate(prompt, body.max_new_tokens)
        return GenerateOut(
            prompt=body.prompt, text=text, max_new_tokens=body.max_new_tokens, applied_edits=service.applied()
        )

    @app.post("/v1/score", response_model=ScoreOut, responses=ERRORS)
    def score(body: ScoreIn):
        """Log-probabilities of each continuation after the prompt (teacher-forced, as the metrics)."""
        if not body.prompt.strip():
            raise HTTPException(422, "prompt: must be more than spaces")
        if any(not c.strip() or len(c) > MAX_PROMPT_CHARS for c in body.continuations):
            raise HTTPException(422, f"continuations: non-empty, at most {MAX_PROMPT_CHARS} characters each")
        return ScoreOut(prompt=body.prompt, scores=service.score(body.prompt, body.continuations))

    # -- edits --------------------------------------------------------------------------------------------
    @app.post(
        "/v1/edits",
        response_model=EntryOut,
        status_code=201,
        responses=ERRORS,
        dependencies=[Depends(same_origin_json), Depends(require_token)],
    )
    def create_edit(
        body: EditIn,
        http: Request,
        idempotency_key: str | None = Header(
            None,
            alias="Idempotency-Key",
            description="a retry with the same key and body gets the first response; nothing is applied "
            "twice (the key is kept in the ledger)",
        ),
    ):
        """Compute an edit, record it in the ledger, apply it; the entry has P(target) before and after."""
        if idempotency_key is not None and not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise HTTPException(422, "Idempotency-Key: 1 to 255 visible ASCII characters")
        method = resolve_method(body.method)
        if method not in available_methods():
            raise HTTPException(
                422, f"unknown method {body.method!r}; available: {', '.join(available_methods())}"
            )
        steps = body.hparams.get("steps")
        if isinstance(steps, (int, float)) and steps > limits.max_edit_steps:
            raise HTTPException(422, f"hparams.steps: at most {limits.max_edit_steps}")
        request = EditRequest(
            prompt=body.prompt,
            subject=body.subject or None,
            target_new=body.target_new,
            target_true=body.target_true or None,
            paraphrase_prompts=list(body.paraphrase_prompts),
            chat=body.chat,
            system=body.system or None,
        )
        try:  # fields, braces and lengths, before the edit waits for the edit lock
            service.check(request)
        except EditRequestError as e:
            raise HTTPException(422, str(e)) from None
        digest = request_digest(body)
        keyed = (idempotency_key, digest) if idempotency_key is not None else None

        def compute() -> tuple[int, dict]:
            try:
                entry = service.edit(
                    request, method, dict(body.hparams), body.verify, audit(http), idempotency=keyed
                )
            except IdempotencyKeyError as e:  # the same key, sent at once through another process
                return 409, _body(409, str(e))
            except (EditRequestError, ArchitectureError, PatchError, LedgerError, ValueError, TypeError) as e:
                # bad request fields, unknown or ill-typed hyperparameters, a method not available here
                return 422, _body(422, str(e) or type(e).__name__)
            return 201, entry.to_dict()

        status, out = compute() if idempotency_key is None else service.once(idempotency_key, digest, compute)
        if status != 201:
            raise HTTPException(status, out["error"])
        return out

    @app.get("/v1/edits", response_model=list[EntryOut])
    def list_edits(state: str | None = Query(None, description="pending | applied | reverted | aborted")):
        try:
            return [e.to_dict() for e in ledger.entries(state)]
        except LedgerError as e:
            raise HTTPException(422, str(e)) from None

    @app.get("/v1/edits/{edit_id}", response_model=EntryOut, responses=ERRORS)
    def get_edit(edit_id: str):
        try:
            return ledger.get(edit_id).to_dict()
        except UnknownEditError as e:
            raise HTTPException(404, str(e)) from None

    @app.delete(
        "/v1/edits/{edit_id}",
        response_model=EntryOut,
        responses=ERRORS,
        dependencies=[Depends(same_origin_json), Depends(require_token)],
    )
    def revert_edit(edit_id: str, http: Request):
        """Revert an applied edit: weights become base + the remaining applied edits, bit for bit."""
        try:
            return service.revert(edit_id, audit(http)).to_dict()
        except UnknownEditError as e:
            raise HTTPException(404, str(e)) from None
        except EditStateError as e:
            raise HTTPException(409, str(e)) from None

    return app
