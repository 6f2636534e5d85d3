"""The one training loop for learned editors (MEND; later KE, ENN, SERAC).

A learned editor is any object with
    param_groups() -> list[dict]            torch optimizer groups, each with its own "lr"
    training_loss(batch) -> (loss, stats)   a differentiable loss and floats to log (validation uses them too)
    train(mode: bool)                       training / evaluation mode (MEND: normalisation statistics update)
    save(directory) / load(directory)       the editor's own files (load copies into the existing parameters)
    finish_training(directory) -> dict      optional: run once after the best editor is loaded (ENN writes its
                                            meta-trained base model); the dict goes to metrics["editor"]

``train_editor`` runs Adam with gradient accumulation and clipping, validates every ``val_every`` steps on
held-out batches, keeps the best editor (lowest validation loss) in ``out_dir``, stops early when the
validation loss stops improving, and writes a resumable checkpoint (editor, optimizer state, step, history)
to ``out_dir/last`` at every validation. Gradients are taken with ``torch.autograd.grad`` on the editor's own
parameters only, so the base model is never trained and never accumulates ``.grad``.
Files: ``metrics.json`` (config, history, best and final validation, wall time, peak RSS), ``curves.png``.
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm


class LearnedEditor(Protocol):
    def param_groups(self) -> list[dict]: ...
    def training_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...
    def train(self, mode: bool = True) -> Any: ...
    def save(self, directory: str | Path) -> None: ...
    def load(self, directory: str | Path) -> None: ...


@dataclass
class TrainConfig:
    """The training loop's settings (learning rates belong to the editor's parameter groups)."""

    steps: int = 2000  # optimizer steps
    grad_accum: int = 1  # batches per optimizer step
    clip: float = 100.0  # max global gradient norm
    val_every: int = 100  # steps between validations
    patience: int = 5  # validations without a lower validation loss before stopping
    max_seconds: float | None = None  # stop (after a final validation) once this much wall time has passed
    log_every: int = 10  # steps averaged into one training history entry


STATE_FILE, OPTIMIZER_FILE = "trainer.json", "optimizer.safetensors"


def _mean_stats(stats: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for s in stats for k in s}
    return {k: statistics.fmean(s[k] for s in stats if k in s) for k in sorted(keys)}


def validate(editor: LearnedEditor, batches: Sequence[Any]) -> dict[str, float]:
    """Mean loss and stats of the editor (in evaluation mode) over the validation batches."""
    editor.train(False)
    try:
        stats = []
        for batch in batches:
            loss, s = editor.training_loss(batch)
            stats.append({"loss": loss.item(), **s})
    finally:
        editor.train(True)
    return _mean_stats(stats)


def _save_checkpoint(editor: LearnedEditor, opt: torch.optim.Optimizer, state: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    editor.save(directory)
    tensors = {
        f"{i}.{k}": v.detach().clone() for i, s in opt.state_dict()["state"].items() for k, v in s.items()
    }
    save_file(tensors, str(directory / OPTIMIZER_FILE))
    (directory / STATE_FILE).write_text(json.dumps(state))


def _load_checkpoint(editor: LearnedEditor, opt: torch.optim.Optimizer, directory: Path) -> dict:
    editor.load(directory)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(directory / OPTIMIZER_FILE)).items():
        i, name = key.split(".", 1)
        opt_state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": opt_state, "param_groups": opt.state_dict()["param_groups"]})
    return json.loads((directory / STATE_FILE).read_text())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_editor(
    editor: LearnedEditor,
    train_batch: Callable[[int], Any],
    val_batches: Sequence[Any],
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train ``editor`` on ``train_batch(0), train_batch(1), ...``; the best editor ends up in ``out_dir``.

    With ``resume=True`` and a checkpoint in ``out_dir/last``, training continues from it (same batches, same
    optimizer state), so a resumed run ends where an uninterrupted one would. Returns the metrics dict.
    """
    out_dir, c = Path(out_dir), config
    last = out_dir / "last"
    opt = torch.optim.Adam(editor.param_groups())
    params = [p for group in opt.param_groups for p in group["params"]]
    state = {
        "step": 0,
        "best_loss": math.inf,
        "best": None,
        "bad_validations": 0,
        "history": [],
        "seconds": 0.0,
    }
    if resume and (last / STATE_FILE).exists():
        state = _load_checkpoint(editor, opt, last)
    start = time.perf_counter() - state["seconds"]
    editor.train(True)
    window: list[dict[str, float]] = []
    recent: deque[dict[str, float]] = deque(maxlen=50)  # for the progress bar's running means
    stop_reason = "steps done"
    bar = tqdm(
        total=c.steps, initial=state["step"], desc="training", disable=not progress, dynamic_ncols=True
    )
    last_val = state["best"] or {}
    while state["step"] < c.steps:
        for micro in range(c.grad_accum):
            loss, stats = editor.training_loss(train_batch(state["step"] * c.grad_accum + micro))
            grads = torch.autograd.grad(loss / c.grad_accum, params, allow_unused=True)
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
            window.append({"loss": loss.item(), **stats})
            recent.append(window[-1])
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, c.clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        step = state["step"]
        running = _mean_stats(list(recent))
        bar.update(1)
        bar.set_postfix(
            {k: f"{running[k]:.3g}" for k in ("loss", "es", "kl") if k in running}
            | {f"val_{k}": f"{last_val[k]:.3g}" for k in ("es", "kl") if k in last_val}
        )
        if step % c.log_every == 0:
            state["history"].append(
                {"step": step, "split": "train", "grad_norm": grad_norm, **_mean_stats(window)}
            )
            window = []
        out_of_time = c.max_seconds is not None and time.perf_counter() - start > c.max_seconds
        if step % c.val_every == 0 or step == c.steps or out_of_time:
            last_val = validate(editor, val_batches)
            state["history"].append({"step": step, "split": "val", **last_val})
            if last_val["loss"] < state["best_loss"]:
                state.update(best_loss=last_val["loss"], best=last_val | {"step": step}, bad_validations=0)
                editor.save(out_dir)
            else:
                state["bad_validations"] += 1
            state["seconds"] = time.perf_counter() - start
            _save_checkpoint(editor, opt, state, last)
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in last_val.items()))
            if state["bad_validations"] >= c.patience:
                stop_reason = f"early stopping: no better validation loss in {c.patience} validations"
                break
        if out_of_time:
            stop_reason = f"time limit of {c.max_seconds} s"
            break
    bar.close()
    if state["best"] is not None:
        editor.load(out_dir)
    editor.train(False)
    # Optional last step once the best state is loaded (ENN writes its new base model).
    finish = getattr(editor, "finish_training", None)
    finished = finish(out_dir) if callable(finish) else None
    metrics = {
        "config": asdict(c),
        "steps": state["step"],
        "stop_reason": stop_reason,
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
        "best_val": state["best"],
        "final_val": last_val,
        "history": state["history"],
    }
    if finished:
        metrics["editor"] = finished
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_curves(state["history"], out_dir / "curves.png")
    return metrics


def plot_curves(history: list[dict], path: str | Path) -> None:
    """One panel per logged quantity, training (thin) and validation (dots) against the step."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    keys = [
        k
        for k in (
            "loss",
            "edit_nll",
            "kl",
            "es",
            "ps",
            "kl_nb",
            "agree_nb",
            "agree_text",
            "alpha",
            "kl_base",
            "lambda",
        )
        if any(k in h for h in history)
    ]
    if not keys:
        return
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        for split, style in (("train", dict(lw=0.8, alpha=0.7)), ("val", dict(marker="o", ms=3))):
            points = [(h["step"], h[key]) for h in history if h["split"] == split and key in h]
            if points:
                ax.plot(*zip(*points, strict=True), label=split, **style)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.savefig(str(path), dpi=90)
