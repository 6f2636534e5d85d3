"""Second moments of MLP keys, C = E[k k^T], from any text: what ROME, MEMIT and AlphaEdit need.

A *key* is the input of a block's MLP output projection (``down_proj`` / ``c_proj`` / ``fc_out`` ...) at one
token. ROME weights its update by C^-1, MEMIT solves a least squares problem weighted by C, and AlphaEdit
projects its update onto the small-eigenvalue subspace of C. C is the uncentred second moment over the tokens
of a text corpus (ROME used 100k tokens of Wikipedia).

Sources (``source`` argument, ``--text`` on the command line):

- a ``.txt`` file: paragraphs separated by blank lines (or lines, if it has no blank line);
- a ``.json`` / ``.jsonl`` file: strings, or records with a ``text`` or ``context`` field (SQuAD's contexts,
  e.g. ``../shared/data/wiki/squad_v2_sample.json``); repeated texts are read once;
- ``hf:NAME[:CONFIG]`` (or a bare ``owner/name`` that is not a file): a Hugging Face dataset's ``text``
  field, streamed (needs the ``datasets`` package and a network);
- ``None``: the offline fallback, text *sampled from the model itself* (seeded, from a few generic first
  words). It needs nothing but the model and is announced as such; a real corpus is better.

Texts are shuffled (seeded), cut into chunks of ``max_length`` tokens and read until ``tokens`` tokens are
counted (padding excluded). One forward pass per batch of chunks serves every requested layer, and stops
after the highest of them (the rest of the model and the LM head are never run).

Results are cached as safetensors under ``cache_dir()/stats/<model fingerprint>/``, keyed by the module, a
hash of the source (file contents, dataset name, or the sampling settings), the chunk length and the token
budget: a different model, file content or budget is a different entry.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchitectureError, architecture
from .hooks import Trace
from .lm import forward, left_padded
from .models import cache_dir, fingerprint

DEFAULT_TOKENS = 100_000
SAMPLE_FIRST_WORDS = (
    "The", "In", "A", "It", "This", "He", "She", "When", "After", "Many", "According to", "During",
    "Although", "Today", "Scientists", "Its", "One of the", "There",
)  # fmt: skip
TEXT_FIELDS = ("text", "context")


class StatsError(ValueError):
    """A text source cannot be used for statistics; the message says why."""


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the needed layers have run."""


# -- text sources --------------------------------------------------------------------------------------------


@dataclass
class TextSource:
    """Where texts come from: a description for people, a hash for the cache, and the texts themselves."""

    description: str
    digest: str
    texts: Iterable[str] | None = None  # None: sample from the model (see ``sampled_texts``)

    @property
    def is_model_samples(self) -> bool:
        return self.texts is None


def _texts_from_json(data, path: Path) -> list[str]:
    if isinstance(data, dict):  # {"data": [...]} or a single record
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        raise StatsError(f"{path}: expected a JSON list of texts or records")
    out = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            field = next((f for f in TEXT_FIELDS if isinstance(item.get(f), str)), None)
            if field is None:
                raise StatsError(
                    f"{path}: record {i} has no text field (expected one of {list(TEXT_FIELDS)}, "
                    f"found {sorted(item)[:8]})"
                )
            out.append(item[field])
        else:
            raise StatsError(f"{path}: record {i} is a {type(item).__name__}, not a text or an object")
    return out


def read_texts(path: str | Path) -> list[str]:
    """Texts of a .txt / .json / .jsonl file (deduplicated, in order); StatsError if unreadable or empty."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as e:
        raise StatsError(f"cannot read text source {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise StatsError(f"cannot read text source {path}: not UTF-8 text") from None
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        try:
            texts = _texts_from_json(json.loads(raw), path)
        except json.JSONDecodeError:
            texts = []
            for n, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    try:
                        texts += _texts_from_json([json.loads(line)], path)
                    except json.JSONDecodeError:
                        raise StatsError(f"{path}: line {n} is not valid JSON") from None
    else:
        blocks = [b for b in raw.split("\n\n") if b.strip()]
        texts = blocks if len(blocks) > 1 else raw.splitlines()
    texts = list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))
    if not texts:
        raise StatsError(f"text source {path} has no text")
    return texts


def _hf_texts(name: str) -> Iterator[str]:
    try:
        import datasets  # optional: only for Hugging Face dataset names
    except ImportError:
        raise StatsError(
            f"{name!r} is not a local file, and Hugging Face datasets need the `datasets` package "
            "(pip install datasets) and a network; give a .txt/.json/.jsonl file instead"
        ) from None
    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split="train", streaming=True)
    except Exception as e:  # network errors, unknown names: one clear line
        raise StatsError(f"cannot load Hugging Face dataset {name!r}: {str(e).splitlines()[0]}") from None
    for record in ds:
        text = next((record[f] for f in TEXT_FIELDS if isinstance(record.get(f), str)), None)
        if text and text.strip():
            yield text


def resolve_source(source: str | Path | None, seed: int = 0) -> TextSource:
    """A TextSource for a file path, ``hf:NAME[:CONFIG]``, or None (text sampled from the model)."""
    if source is None or str(source).strip() in ("", "model", "model-samples"):
        return TextSource(f"text sampled from the model itself (offline fallback, seed {seed})",
                          f"model-samples-v1-seed{seed}")  # fmt: skip
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        texts = read_texts(path)
        digest = hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest()
        return TextSource(f"{path} ({len(texts)} texts)", f"file-{digest}-seed{seed}", texts)
    if path.is_dir():
        raise StatsError(f"text source {path} is a directory; give a .txt, .json or .jsonl file")
    name = text[3:] if text.startswith("hf:") else text
    looks_like_file = path.suffix.lower() in (".txt", ".json", ".jsonl") or text.startswith((".", "/", "~"))
    if looks_like_file and not text.startswith("hf:"):
        raise StatsError(f"text source {path} does not exist")
    digest = hashlib.blake2b(name.encode(), digest_size=8).hexdigest()
    return TextSource(f"Hugging Face dataset {name}", f"hf-{digest}", _hf_texts(name))


@torch.no_grad()
def sampled_texts(
    model: nn.Module, tokenizer, n_tokens: int, length: int = 128, batch_size: int = 16, seed: int = 0
) -> Iterator[str]:
    """Texts sampled from the model (top-k 50), seeded without touching the global random state."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(seed)
    produced = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while produced < n_tokens:
            starts = [rng.choice(SAMPLE_FIRST_WORDS) for _ in range(batch_size)]
            enc = left_padded(tokenizer, starts, device)
            out = model.generate(**enc, do_sample=True, top_k=50, max_new_tokens=length, pad_token_id=pad)
            for row in out[:, enc["input_ids"].shape[1] :]:
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                if text:
                    produced += len(row)
                    yield text


# -- the statistics ------------------------------------------------------------------------------------------


@dataclass
class Moments:
    """E[k k^T] of one MLP output projection's inputs."""

    layer: int
    module: str
    mom2: torch.Tensor  # (d_in, d_in), float32
    tokens: int  # tokens it was computed on
    source: str  # description of the text source
    path: Path  # cache file
    cached: bool  # read from the cache rather than computed
    seconds: float = 0.0


def cache_path(model: nn.Module, module: str, source: TextSource, tokens: int, max_length: int) -> Path:
    name = f"{module}__{source.digest}__len{max_length}__{tokens}.safetensors"
    return cache_dir() / "stats" / fingerprint(model) / name


def _load_cached(path: Path) -> tuple[torch.Tensor, dict] | None:
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("mom2"), json.loads((f.metadata() or {}).get("modeledit_stats", "{}"))
    except Exception:  # a corrupt cache entry is recomputed, never trusted
        return None


def _chunks(tokenizer, texts: Iterable[str], max_length: int) -> Iterator[list[int]]:
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        for i in range(0, len(ids), max_length):
            piece = ids[i : i + max_length]
            if len(piece) >= 2:
                yield piece


def forward_until(
    model: nn.Module, last_module: str, inputs: dict, params: dict[str, torch.Tensor] | None = None
) -> None:
    """Run the model on ``inputs`` (with ``params`` substituted, see ``lm.forward``) only until
    ``last_module`` has produced its output: hooks see everything up to it; later blocks and the LM head are
    skipped."""

    def stop(module, args, output):
        raise _StopForward

    handle = model.get_submodule(last_module).register_forward_hook(stop)
    try:
        forward(model, inputs, params)
    except _StopForward:
        pass
    finally:
        handle.remove()


def second_moments(
    model: nn.Module,
    tokenizer,
    layers: list[int],
    source: str | Path | None = None,
    tokens: int = DEFAULT_TOKENS,
    max_length: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    use_cache: bool = True,
    log=print,
) -> dict[int, Moments]:
    """E[k k^T] of the MLP keys of each layer in ``layers`` (decoder blocks), computed in one pass."""
    arch = architecture(model)
    if arch.is_seq2seq:
        raise ArchitectureError("key statistics are implemented for decoder-only models")
    if tokens < 1:
        raise StatsError(f"the token budget must be positive, got {tokens}")
    layers = sorted({layer % arch.num_layers if layer < 0 else layer for layer in layers})
    context = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    max_length = min(max_length, context) if context else max_length
    modules = {layer: arch.mlp_out(layer) for layer in layers}
    src = resolve_source(source, seed)
    result: dict[int, Moments] = {}
    missing = []
    for layer, module in modules.items():
        path = cache_path(model, module, src, tokens, max_length)
        hit = _load_cached(path) if use_cache else None
        if hit is not None:
            mom2, meta = hit
            result[layer] = Moments(
                layer, module, mom2, meta.get("tokens", 0), meta.get("source", ""), path, True
            )
        else:
            missing.append(layer)
    if not missing:
        return result

    if src.is_model_samples:
        log(
            f"[modeledit] no text source given: using {src.description}; "
            "pass a text file for better statistics"
        )
        texts: Iterable[str] = sampled_texts(model, tokenizer, tokens + tokens // 4, seed=seed)
    else:
        texts = src.texts
        if isinstance(texts, list):
            texts = list(texts)
            random.Random(seed).shuffle(texts)
    start = time.perf_counter()
    device = next(model.parameters()).device
    names = [modules[layer] for layer in missing]
    dims = {name: arch.weight_as_out_in(name).shape[1] for name in names}
    sums = {name: torch.zeros(dims[name], dims[name], dtype=torch.float64, device=device) for name in names}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    count = 0
    bar = tqdm(total=tokens, unit="tok", desc=f"key statistics, layers {missing}", disable=not progress)
    batch: list[list[int]] = []

    def flush() -> None:
        nonlocal count
        width = max(len(r) for r in batch)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in batch], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch], device=device)
        with (
            torch.no_grad(),
            Trace(model, names, capture_input=True, capture_output=False, detach=True) as tr,
        ):
            forward_until(model, names[-1], {"input_ids": ids, "attention_mask": mask})
        keep = mask.reshape(-1).bool()
        for name in names:
            k = tr[name].input.reshape(-1, dims[name])[keep].double()
            sums[name] += k.T @ k
        n = int(keep.sum())
        count += n
        bar.update(n)
        batch.clear()

    try:
        for chunk in _chunks(tokenizer, texts, max_length):
            chunk = chunk[: tokens - count - sum(len(r) for r in batch)]
            if chunk:
                batch.append(chunk)
            if len(batch) == batch_size or count + sum(len(r) for r in batch) >= tokens:
                flush()
            if count >= tokens:
                break
        if batch:
            flush()
    finally:
        bar.close()
    if count == 0:
        raise StatsError(f"text source {src.description} gave no tokens")
    seconds = time.perf_counter() - start
    if count < tokens:
        log(f"[modeledit] {src.description} has only {count} tokens (asked for {tokens})")
    for layer in missing:
        name = modules[layer]
        mom2 = (sums[name] / count).float().cpu()
        path = cache_path(model, name, src, tokens, max_length)
        meta = {"tokens": count, "source": src.description, "module": name, "seconds": seconds}
        if use_cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".partial")
            save_file({"mom2": mom2.contiguous()}, str(tmp), metadata={"modeledit_stats": json.dumps(meta)})
            tmp.replace(path)
        result[layer] = Moments(layer, name, mom2, count, src.description, path, False, seconds)
    return result
