"""One evaluation path for every method: single, batch and sequential protocols, with timing.

- single: edit one record, score it, revert (the ROME/MEND protocol);
- batch: one patch for B records, score them, revert;
- sequential: apply the patches one after another and score every record after the last one (retention);
  with ``retention_points=P``, also score all edits made so far at P evenly spaced points of the stream (the
  retention curve), and the perplexity of unrelated text before the first and after the last edit.

With a ``checkpoint`` file, every protocol can be interrupted and resumed: single/batch runs keep each scored
chunk; a sequential run keeps its stream (the patches made so far and the editor's own state, see
``Editor.state``), saved every ``SAVE_SECONDS`` and after the last edit, and a resumed run re-applies them to
the base model and goes on with the next edit.

``seconds_fwd_bwd`` is one forward+backward of the edit loss (gradients for the MLP matrices of the last
3 blocks, MEND's setting) on the edit's own input, timed just before the edit on up to
``REFERENCE_SAMPLES`` records spread over the run (their mean; ``seconds_fwd`` likewise for a forward pass),
so that ``edit_cost_ratio = seconds_per_edit / seconds_fwd_bwd`` compares the two on the same inputs and
under the same load (a machine's speed drifts over minutes), and methods across machines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import statistics
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .arch import architecture
from .editor import Editor
from .forms import FORMS, in_chat_form, render_chat, rendered
from .lm import generate, is_seq2seq, mean_nll, target_batch, text_perplexity
from .locality import default_locality_texts
from .metrics import (
    generated_answers,
    generation_metrics,
    n_gram_entropy,
    record_metrics,
    score_request,
    summarize,
)
from .models import fingerprint
from .patch import Patch, revert_all
from .requests import EditRequest
from .training.trainer import peak_rss_mb

SUMMARY_KEYS = ("ES", "PS", "NS", "S", "ES_gen", "PS_gen", "NS_gen", "EM", "PM", "NM")
SAVE_SECONDS = 60.0  # a checkpointed sequential run saves its stream at most this often (and after the end)
REFERENCE_SAMPLES = 50  # records whose reference passes are timed, spread over a run


def reference_seconds(model: nn.Module, tokenizer, r: EditRequest) -> tuple[float, float]:
    """Seconds of one forward pass and of one forward+backward of the edit loss of ``r``: the lower bounds
    of memory-based and of gradient-based editors."""
    names = [f"{m}.weight" for m in architecture(model).last_mlp_linears(3)]
    params = dict(model.named_parameters())
    leaves = {n: params[n].detach().requires_grad_(True) for n in names}
    r = rendered(r, tokenizer)
    batch = target_batch(tokenizer, [r.text], [r.target_new], is_seq2seq(model))
    start = time.perf_counter()
    with torch.no_grad():
        mean_nll(model, batch)
    fwd = time.perf_counter() - start
    start = time.perf_counter()
    loss = mean_nll(model, batch, params=leaves).mean()
    torch.autograd.grad(loss, list(leaves.values()))
    return fwd, time.perf_counter() - start


def time_reference_passes(
    model: nn.Module, tokenizer, requests: list[EditRequest], repeats: int = 5
) -> dict[str, float]:
    """Median seconds of ``reference_seconds`` over ``repeats`` passes of the requests in turn (one more
    first, to warm up)."""
    times = [reference_seconds(model, tokenizer, r) for r in (requests * (repeats + 1))[: repeats + 1]]
    fwd, fwd_bwd = zip(*times[1:])
    return {"seconds_fwd": statistics.median(fwd), "seconds_fwd_bwd": statistics.median(fwd_bwd)}


def _fluency(model: nn.Module, tokenizer, r: EditRequest, max_new_tokens: int) -> float:
    r = rendered(r, tokenizer)
    prompts = r.generation_prompts or [r.text]
    return n_gram_entropy(generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens))


def _record_result(
    model, tokenizer, r: EditRequest, pre: dict, fluency_tokens: int, edited: bool, before: dict | None
) -> dict:
    """One record's scores after its edit; ``before``: the unedited model's answers (None: no generation)."""
    post = record_metrics(score_request(model, tokenizer, r)) if edited else dict(pre)  # unedited: scored
    result = {"case_id": r.case_id, "pre": pre, "post": post}
    if before is not None:
        after = generated_answers(model, tokenizer, r) if edited else before
        post |= generation_metrics(r, after, before)
        result["answers"] = {"before": before, "after": after}
    if pre.get("neighborhood_acc") is not None:
        result["drawdown_acc"] = pre["neighborhood_acc"] - post["neighborhood_acc"]
        # MEND's perplexity drawdown: relative increase of the locality perplexity.
        result["drawdown_ppl"] = math.exp(post["neighborhood_nll"] - pre["neighborhood_nll"]) - 1.0
    if fluency_tokens:
        result["fluency"] = _fluency(model, tokenizer, r, fluency_tokens)
    return result


def evaluate(
    model: nn.Module,
    tokenizer,
    editor: Editor | None,
    requests: list[EditRequest],
    mode: str = "single",
    batch_size: int = 1,
    fluency_tokens: int = 0,
    progress: bool = True,
    retention_points: int = 0,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    form: str = "plain",
    generation: bool = True,
) -> dict:
    """Edit and score ``requests``; ``editor=None`` scores the unedited model. Returns summary and records
    (and, sequential with ``retention_points``, the retention curve).

    ``form``: "plain" (each prompt as written: cloze or question) or "chat" (every prompt a user turn, the
    edits made in that form). ``generation``: also the generation-based ES_gen / PS_gen / NS_gen (greedy
    answers before and after each edit; see ``metrics.py``).

    ``checkpoint``: a JSON-lines file that receives the run's progress as it goes (see ``_Checkpoint``); with
    ``resume``, what it holds is not done again (it must come from the same method, settings, mode and
    records; a sequential run also needs a fresh ``editor`` and the unedited ``model``)."""
    if mode not in ("single", "batch", "sequential"):
        raise ValueError(f"unknown mode {mode!r}: use single, batch or sequential")
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}: use {' or '.join(FORMS)}")
    if form == "chat":
        render_chat(tokenizer, "?")  # a clear error now for a model without a chat template
        requests = [in_chat_form(r) for r in requests]
    if mode == "single":
        batch_size = 1
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    if retention_points and mode != "sequential":
        raise ValueError("a retention curve needs --mode sequential")
    chunks = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    # Chunk indices after which all edits so far are scored (the last point is the final scoring itself).
    points = sorted(
        {max(round(len(chunks) * (i + 1) / retention_points) - 1, 0) for i in range(retention_points)}
    )
    retention: list[dict] = []
    sequential = mode == "sequential"
    saved = _Checkpoint(
        checkpoint, model, editor, mode, batch_size, fluency_tokens, requests, resume, generation
    )
    unrelated = default_locality_texts()
    if saved.before is not None:  # a resumed sequential run: scored before its first edit already
        pre = {id(r): m for r, m in zip(requests, saved.before["pre"], strict=True)}
        gens = saved.before.get("answers") or [None] * len(requests)
        answers_before = {id(r): a for r, a in zip(requests, gens, strict=True)}
        ppl_before = saved.before["ppl_before"]
    else:
        ppl_before = text_perplexity(model, tokenizer, unrelated) if sequential else None
        pending = [r for i, c in enumerate(chunks) if i not in saved.chunks for r in c]
        pre, answers_before = {}, {}
        # the unedited model's answers: to neighbours (NS_gen), and to everything when nothing is edited
        groups = ("neighborhood",) if editor is not None else ("rewrite", "paraphrase", "neighborhood")
        for r in tqdm(pending, desc="scoring before", disable=not progress):
            pre[id(r)] = record_metrics(score_request(model, tokenizer, r))
            answers_before[id(r)] = generated_answers(model, tokenizer, r, groups) if generation else None
        if sequential:
            saved.write(
                {
                    "pre": [pre[id(r)] for r in requests],
                    "answers": [answers_before[id(r)] for r in requests],
                    "ppl_before": ppl_before,
                }
            )
    edit_seconds: list[float] = []
    reference: list[tuple[float, float]] = []  # (forward, forward+backward) seconds
    stride = max(1, len(chunks) // REFERENCE_SAMPLES)
    per_chunk = math.ceil(REFERENCE_SAMPLES / (len(chunks) * stride))  # few chunks (big batches): more each
    results: list[dict] = []
    replayed = -1  # a resumed sequential run: the chunks up to this one are applied from the checkpoint
    bar = tqdm(chunks, desc=f"{editor.name if editor else 'none'} ({mode})", disable=not progress)
    try:
        if saved.stream is not None:
            replayed = saved.restore_stream(model, editor)
            edit_seconds, retention = list(saved.stream["seconds"]), list(saved.stream["retention"])
        for i, chunk in enumerate(bar):
            if i in saved.chunks:  # done by an earlier, interrupted run
                results += saved.chunks[i]["results"]
                edit_seconds += saved.chunks[i]["seconds"]
                continue
            if i <= replayed:
                continue
            patch = None
            if editor is not None:
                if i % stride == 0:  # the reference passes on this chunk's own inputs, under the same load
                    if not reference:
                        reference_seconds(model, tokenizer, chunk[0])  # warm-up, not counted
                    reference += [reference_seconds(model, tokenizer, r) for r in chunk[:per_chunk]]
                start = time.perf_counter()
                patch = editor.edit(chunk)
                edit_seconds.append(time.perf_counter() - start)
                patch.apply(model)
            if not sequential:
                results += [
                    _record_result(
                        model, tokenizer, r, pre[id(r)], fluency_tokens, editor is not None,
                        answers_before[id(r)],
                    )  # fmt: skip
                    for r in chunk
                ]
                if patch is not None:
                    patch.revert(model)
                saved.add(i, results[-len(chunk) :], edit_seconds[-1:] if editor is not None else [])
                bar.set_postfix(_running(results))
                continue
            if retention_points and i in points[:-1]:
                done = [r for c in chunks[: i + 1] for r in c]
                so_far = [
                    _record_result(model, tokenizer, r, pre[id(r)], 0, editor is not None, None)
                    for r in done
                ]
                retention.append(_retention_point(so_far))
                bar.set_postfix(
                    {k: f"{v:.0f}" for k, v in retention[-1].items() if k != "edits" and v is not None}
                )
            saved.keep_stream(i, patch, editor, edit_seconds, retention, last=i == len(chunks) - 1)
        if sequential:
            results = [
                _record_result(
                    model, tokenizer, r, pre[id(r)], fluency_tokens, editor is not None,
                    answers_before[id(r)],
                )  # fmt: skip
                for r in tqdm(requests, desc="scoring after the last edit", disable=not progress)
            ]
        ppl_after = text_perplexity(model, tokenizer, unrelated) if sequential else None
    finally:
        revert_all(model)
    if retention_points:
        retention.append(_retention_point(results))
    summary = summarize([r["post"] for r in results])
    summary = {k: summary.get(k) for k in SUMMARY_KEYS} | {
        k: v for k, v in summary.items() if k not in SUMMARY_KEYS
    }
    summary["NS_before"] = summarize([r["pre"] for r in results]).get("NS")
    for key in ("drawdown_acc", "drawdown_ppl", "fluency"):
        values = [r[key] for r in results if key in r]
        if values:
            summary[key] = statistics.fmean(values)
    if any("drawdown_ppl" in r for r in results):
        summary["drawdown_ppl_geo"] = geometric_drawdown(results)
    summary["n"] = len(results)
    summary["peak_rss_mb"] = peak_rss_mb()  # of this process so far (a bench runs one eval per process)
    if (
        sequential
    ):  # MEND's other drawdown: perplexity of unrelated text, before the first / after the last edit
        summary |= {"unrelated_ppl_before": ppl_before, "unrelated_ppl_after": ppl_after}
    if editor is not None:
        if reference:
            fwd, fwd_bwd = (statistics.fmean(t) for t in zip(*reference))
            passes = {"seconds_fwd": fwd, "seconds_fwd_bwd": fwd_bwd}
        else:  # a resumed run whose edits were all done before: time them now
            passes = time_reference_passes(model, tokenizer, requests[:5])
        per_edit = sum(edit_seconds) / len(requests)
        summary |= {
            "seconds_per_edit": per_edit,
            "seconds_per_patch": statistics.fmean(edit_seconds),
            **passes,
            "edit_cost_ratio": per_edit / passes["seconds_fwd_bwd"],
        }
    return {
        "method": editor.name if editor else "none",
        "form": form,
        "mode": mode,
        "batch_size": batch_size,
        "hparams": editor.config.__dict__ if editor else {},
        "summary": summary,
        "retention": retention,
        "records": results,
    }


class _Checkpoint:
    """What an evaluation has done so far, in a JSON-lines file: a header line that identifies the run
    (model fingerprint, method, settings, mode, records), then

    - single/batch: one line per scored chunk, ``{"chunk", "results", "seconds"}``;
    - sequential: the scores before the first edit, ``{"pre", "ppl_before"}``, then one line per save of the
      stream, ``{"done", "seconds", "retention"}``: the model after chunk ``done`` is the base model plus the
      patches in the folder ``PATH.patches`` (one file per chunk, in order), and the editor's own state is
      ``state-DONE.safetensors`` there.

    Inactive without a path."""

    def __init__(
        self, path, model, editor, mode, batch_size, fluency_tokens, requests, resume: bool, generation: bool
    ):
        self.path = Path(path) if path is not None else None
        self.chunks: dict[int, dict] = {}
        self.before: dict | None = None  # sequential: {"pre", "ppl_before"}
        self.stream: dict | None = None  # sequential: the last save {"done", "seconds", "retention"}
        self.unsaved: list[tuple[int, Patch]] = []
        self.last_save = time.monotonic()
        if self.path is None:
            return
        self.folder = stream_folder(self.path)
        records = hashlib.sha256(
            json.dumps([dataclasses.asdict(r) for r in requests], sort_keys=True, default=str).encode()
        ).hexdigest()
        self.header = json.loads(
            json.dumps(
                {
                    "method": editor.name if editor else "none",
                    "hparams": editor.config.__dict__ if editor else {},
                    "mode": mode,
                    "batch_size": batch_size,
                    "fluency_tokens": fluency_tokens,
                    "generation": generation,
                    "records": records,
                    "model": fingerprint(model),
                },
                sort_keys=True,
                default=str,
            )
        )
        if resume and self.path.exists():
            lines = self.path.read_text().splitlines()
            header = json.loads(lines[0]) if lines else None
            if header is not None and "model" not in header:  # written before the header named the model
                header["model"] = self.header["model"]
            if header is not None and "generation" not in header:  # written before generation metrics
                header["generation"] = False
            if header != self.header:
                raise ValueError(
                    f"{self.path} was written by a different evaluation (model, method, settings, mode or "
                    "records differ); delete it to start over"
                )
            kept = 1
            for line in lines[1:]:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # the line being written when the run was killed
                    break
                kept += 1
                if "chunk" in entry:
                    self.chunks[entry["chunk"]] = entry
                elif "pre" in entry:
                    self.before = entry
                elif "done" in entry:
                    self.stream = entry
            self.path.write_text("".join(line + "\n" for line in lines[:kept]))
        else:
            remove_checkpoint(self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.header, sort_keys=True) + "\n")

    def write(self, entry: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(entry, default=str) + "\n")

    def add(self, index: int, results: list[dict], seconds: list[float]) -> None:
        self.write({"chunk": index, "results": results, "seconds": seconds})

    def keep_stream(
        self, index: int, patch: Patch | None, editor: Editor | None, seconds: list[float],
        retention: list[dict], last: bool,
    ) -> None:  # fmt: skip
        """Sequential: note chunk ``index``'s patch; save the stream if ``SAVE_SECONDS`` have passed or
        ``last``. Files first, the line that points at them last, so a killed save leaves the previous one."""
        if self.path is None:
            return
        if patch is not None:
            self.unsaved.append((index, patch))
        if not last and time.monotonic() - self.last_save < SAVE_SECONDS:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for i, p in self.unsaved:
            p.save(self.folder / f"{i:06d}.safetensors")
        self.unsaved = []
        tensors, meta = editor.state() if editor is not None else ({}, {})
        state = self.folder / f"state-{index:06d}.safetensors"
        tensors = {k: t.contiguous() for k, t in tensors.items()}
        save_file(tensors, str(state), metadata={"modeledit": json.dumps(meta)})
        self.write({"done": index, "seconds": seconds, "retention": retention})
        for old in self.folder.glob("state-*.safetensors"):
            if old != state:
                old.unlink()
        self.last_save = time.monotonic()

    def restore_stream(self, model: nn.Module, editor: Editor | None) -> int:
        """Sequential resume: the editor's state (on the base model), then the saved patches applied in order;
        returns the last chunk they cover."""
        done = self.stream["done"]
        if editor is not None:
            with safe_open(str(self.folder / f"state-{done:06d}.safetensors"), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                meta = json.loads((f.metadata() or {}).get("modeledit", "{}"))
            editor.load_state(tensors, meta)
            for i in tqdm(range(done + 1), desc="re-applying the saved patches", leave=False):
                Patch.load(self.folder / f"{i:06d}.safetensors").apply(model)
        return done


def stream_folder(checkpoint: Path) -> Path:
    """Where a sequential run keeps its patches and editor state beside its checkpoint file."""
    return checkpoint.with_name(checkpoint.name + ".patches")


def remove_checkpoint(checkpoint: str | Path) -> None:
    """Delete a checkpoint file and a sequential run's folder beside it."""
    checkpoint = Path(checkpoint)
    checkpoint.unlink(missing_ok=True)
    shutil.rmtree(stream_folder(checkpoint), ignore_errors=True)


def geometric_drawdown(results: list[dict]) -> float:
    """exp(mean over records of log(ppl after / ppl before)) - 1: the typical relative change of neighbour
    perplexity. The arithmetic mean of the ratios (``drawdown_ppl``) is dominated by the few records whose
    neighbour answer became very unlikely (ratios of 1e6 and more after batches of edits)."""
    logs = [math.log1p(r["drawdown_ppl"]) for r in results if "drawdown_ppl" in r]
    return math.expm1(statistics.fmean(logs)) if logs else float("nan")


def _retention_point(results: list[dict]) -> dict:
    s = summarize([r["post"] for r in results])
    return {"edits": len(results)} | {k: s.get(k) for k in ("ES", "PS", "NS", "S")}


def _running(results: list[dict]) -> dict[str, str]:
    s = summarize([r["post"] for r in results])
    return {k: f"{s[k]:.0f}" for k in ("ES", "PS", "NS") if s.get(k) is not None}


def evaluate_forms(
    model: nn.Module,
    tokenizer,
    editor: Editor | None,
    requests: list[EditRequest],
    forms: tuple[str, ...] = ("plain",),
    checkpoint: str | Path | None = None,
    **kwargs,
) -> dict:
    """``evaluate`` once per form (each edit made in that form); the chat form's summary keys and records get
    the suffix ``_chat`` (``ES_chat``, ``ES_gen_chat``, ...) in one merged result."""
    unknown = [f for f in forms if f not in FORMS]
    if not forms or unknown:
        raise ValueError(f"unknown form(s) {unknown or list(forms)}: use {', '.join(FORMS)}")
    merged: dict = {}
    for form in dict.fromkeys(forms):
        path = checkpoint
        if checkpoint is not None and form != "plain":
            path = Path(checkpoint).with_name(f"{Path(checkpoint).name}.{form}")
        result = evaluate(model, tokenizer, editor, requests, checkpoint=path, form=form, **kwargs)
        suffix = "" if form == "plain" else f"_{form}"
        if not merged:
            merged = dict(result) | {"summary": {}, "forms": []}
            merged.pop("records")
        merged["forms"].append(form)
        merged["summary"] |= {f"{k}{suffix}": v for k, v in result["summary"].items()}
        merged[f"records{suffix}"] = result["records"]
        merged[f"retention{suffix}"] = result["retention"]
    return merged


def checkpoints_of(checkpoint: str | Path, forms: tuple[str, ...]) -> list[Path]:
    """The checkpoint files ``evaluate_forms`` writes for ``forms``."""
    checkpoint = Path(checkpoint)
    return [checkpoint if f == "plain" else checkpoint.with_name(f"{checkpoint.name}.{f}") for f in forms]
