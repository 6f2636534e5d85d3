"""The one command-line interface: ``modeledit demo | edit | eval | methods``."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Edit pre-trained neural networks locally.")
console = Console()

DEMO_EDIT = dict(
    prompt="The mother tongue of {} is",
    subject="Danielle Darrieux",
    target_new="English",
)
DEMO_PROMPTS = {
    "edit prompt": "The mother tongue of Danielle Darrieux is",
    "paraphrase": "Danielle Darrieux's native language is",
    "neighbour": "Michel Rocard is a native speaker of",
    "unrelated": "The capital of France is",
}


def _user_errors() -> tuple[type[Exception], ...]:
    from .arch import ArchitectureError
    from .models import ModelLoadError
    from .patch import PatchError
    from .requests import EditRequestError

    return (EditRequestError, ModelLoadError, PatchError, ArchitectureError, ValueError, OSError)


def _run(fn):
    """Run a command body; user errors become one clear line and exit code 2, never a traceback."""
    try:
        return fn()
    except _user_errors() as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(2) from None


def _parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _load(model_name: str):
    import torch

    from .models import load_model

    torch.set_grad_enabled(True)
    with console.status(f"loading model {model_name!r}"):
        start = time.perf_counter()
        model, tokenizer = load_model(model_name)
    console.print(f"loaded {model_name!r} in {time.perf_counter() - start:.1f} s", style="dim")
    return model, tokenizer


def _p_target(model, tokenizer, prompt: str, target: str) -> float:
    from .metrics import score_pairs

    return math.exp(-score_pairs(model, tokenizer, [prompt], [target])[0].nll)


@app.command()
def methods() -> None:
    """List the editing methods and their hyperparameters."""
    import dataclasses

    from .editor import EDITORS, available_methods

    for name in available_methods():
        cls = EDITORS[name]
        fields = ", ".join(f"{f.name}={f.default!r}" if f.default is not dataclasses.MISSING else f.name for f in dataclasses.fields(cls.Config))
        console.print(f"[bold]{name}[/]: {(cls.Config.__doc__ or '').strip().splitlines()[0]}\n  {fields}", highlight=False)


@app.command()
def demo(
    model_name: str = typer.Option("default", "--model", help="model to edit"),
    method: str = typer.Option("ft-l", help="editing method"),
) -> None:
    """The main job: answers before an edit, after it, and after reverting it."""

    def body():
        from .editor import create_editor
        from .lm import generate
        from .requests import EditRequest

        model, tokenizer = _load(model_name)
        request = EditRequest(**DEMO_EDIT)
        labels, prompts = list(DEMO_PROMPTS), list(DEMO_PROMPTS.values())

        def show(title: str) -> list[str]:
            answers = generate(model, tokenizer, prompts, max_new_tokens=8)
            table = Table(title=title, title_justify="left")
            table.add_column("")
            table.add_column("prompt")
            table.add_column("greedy answer")
            table.add_column(f"P({request.target_new})", justify="right")
            for label, prompt, answer in zip(labels, prompts, answers):
                table.add_row(label, prompt, answer.strip().split("\n")[0], f"{_p_target(model, tokenizer, prompt, request.target_new):.3f}")
            console.print(table)
            return answers

        before = show("1. before the edit")
        console.print(f"\nedit ({method}): {request.text!r} -> {request.target_new!r}")
        editor = create_editor(method, model, tokenizer)
        start = time.perf_counter()
        with console.status("computing the patch"):
            patch = editor.edit([request])
        console.print(f"patch computed in {time.perf_counter() - start:.1f} s: {patch}\n", highlight=False)
        patch.apply(model)
        show("2. after the edit")
        patch.revert(model)
        restored = show("3. after reverting the patch")
        same = "yes" if restored == before else "NO"
        console.print(f"\noriginal answers restored: {same}")

    _run(body)


@app.command()
def edit(
    prompt: str = typer.Option(..., help="prompt, containing the subject or {} for it"),
    target: str = typer.Option(..., help="the new answer"),
    subject: str = typer.Option(None, help="the subject in the prompt"),
    model_name: str = typer.Option("default", "--model"),
    method: str = typer.Option("ft-l"),
    paraphrase: list[str] = typer.Option([], help="extra prompts to show before/after (repeatable)"),
    set_: list[str] = typer.Option([], "--set", help="hyperparameter override KEY=VALUE (repeatable)"),
    save: Path = typer.Option(None, help="save the patch to this .safetensors file"),
) -> None:
    """Edit one fact and show greedy completions and P(target) before and after."""

    def body():
        from .editor import create_editor
        from .lm import generate
        from .requests import EditRequest

        request = EditRequest(prompt=prompt, subject=subject, target_new=target)
        request.validate()
        model, tokenizer = _load(model_name)
        editor = create_editor(method, model, tokenizer, **_parse_overrides(set_))
        prompts = [request.text, *paraphrase]
        before = generate(model, tokenizer, prompts)
        p_before = [_p_target(model, tokenizer, p, target) for p in prompts]
        if before[0].strip().startswith(target.strip()):
            console.print(f"[yellow]note:[/] the model already answers {target!r}; editing anyway")
        with console.status("computing the patch"):
            patch = editor.edit([request])
        patch.apply(model)
        after = generate(model, tokenizer, prompts)
        p_after = [_p_target(model, tokenizer, p, target) for p in prompts]
        table = Table()
        for col in ("prompt", "before", f"P({target}) before", "after", f"P({target}) after"):
            table.add_column(col)
        for row in zip(prompts, before, p_before, after, p_after):
            table.add_row(row[0], row[1].strip(), f"{row[2]:.3f}", row[3].strip(), f"{row[4]:.3f}")
        console.print(table)
        console.print(f"{patch} in {patch.info['seconds']:.2f} s", highlight=False)
        if save:
            console.print(f"saved patch to {patch.save(save)}")

    _run(body)


@app.command("eval")
def eval_(
    data: Path = typer.Option(..., help="CounterFact / flattened CounterFact / zsRE / EditRequest JSON or JSONL"),
    method: str = typer.Option(..., help="editing method, or 'none' for the unedited model"),
    model_name: str = typer.Option("default", "--model"),
    offset: int = typer.Option(0),
    limit: int = typer.Option(None),
    mode: str = typer.Option("single", help="single | batch | sequential"),
    batch_size: int = typer.Option(1),
    fluency_tokens: int = typer.Option(0, help="generate this many tokens per record for ROME's fluency (0: off)"),
    set_: list[str] = typer.Option([], "--set", help="hyperparameter override KEY=VALUE (repeatable)"),
    out: Path = typer.Option(None, help="write summary and per-record results as JSON"),
) -> None:
    """Edit records of a data file and measure ES/PS/NS/S, EM/PM/NM, accuracy and drawdown."""

    def body():
        from .editor import create_editor
        from .evaluate import evaluate
        from .requests import load_requests

        requests = load_requests(data, offset=offset, limit=limit)
        model, tokenizer = _load(model_name)
        editor = None if method == "none" else create_editor(method, model, tokenizer, **_parse_overrides(set_))
        result = evaluate(model, tokenizer, editor, requests, mode=mode, batch_size=batch_size, fluency_tokens=fluency_tokens)
        result |= {"model": model_name, "data": str(data), "offset": offset}
        table = Table(title=f"{result['method']} on {data.name} [{offset}:{offset + len(requests)}], {mode}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in result["summary"].items():
            table.add_row(key, "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value))
        console.print(table)
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1, default=str))
            console.print(f"wrote {out}")

    _run(body)


@app.command()
def train(
    method: str = typer.Argument(..., help="learned editor to train, e.g. mend"),
    data: Path = typer.Option(..., help="training edits (CounterFact / flattened / zsRE, JSON or JSONL)"),
    out: Path = typer.Option(..., help="folder for the editor, curves.png, metrics.json, checkpoints"),
    model_name: str = typer.Option("default", "--model"),
    val: Path = typer.Option(None, help="validation edits; default: the last --val-size records of --data"),
    val_size: int = typer.Option(100, help="held-out edits for validation"),
    limit: int = typer.Option(None, help="use at most this many training edits"),
    steps: int = typer.Option(None, help="optimizer steps (default: the trainer's)"),
    edits_per_batch: int = typer.Option(1, help="edits per training batch (applied together)"),
    texts_per_batch: int = typer.Option(2, help="unrelated texts per batch for the locality loss"),
    wiki: Path = typer.Option(None, help="SQuAD-style JSON whose contexts give the unrelated texts"),
    threads: int = typer.Option(None, help="torch CPU threads"),
    resume: bool = typer.Option(False, help="continue from OUT/last"),
    seed: int = typer.Option(0, help="shuffling of the training edits"),
    set_: list[str] = typer.Option([], "--set", help="editor or trainer setting KEY=VALUE (repeatable)"),
) -> None:
    """Train a learned editor (MEND) for a model; use it with --set editor_path=OUT."""

    def body():
        import dataclasses

        import torch

        from .editor import EDITORS, available_methods
        from .lm import is_seq2seq
        from .locality import default_locality_texts
        from .requests import load_requests
        from .training import EditBatches, TrainConfig, split_train_val, train_editor, validation_batches
        from .training.data import wiki_sentences

        learned = [m for m in available_methods() if hasattr(EDITORS[m], "for_training")]
        if method not in learned:
            raise ValueError(f"{method!r} is not a learned editor; trainable: {', '.join(learned)}")
        cls = EDITORS[method]
        overrides = _parse_overrides(set_)
        method_keys = {f.name for f in dataclasses.fields(cls.Config)}
        train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = set(overrides) - method_keys - train_keys
        if unknown:
            valid = sorted(method_keys | train_keys)
            raise ValueError(f"unknown setting(s) {sorted(unknown)}; valid: {valid}")
        train_config = TrainConfig(**{k: v for k, v in overrides.items() if k in train_keys})
        if steps is not None:
            train_config.steps = steps
        if threads:
            torch.set_num_threads(threads)
        if val is None:
            train_requests, val_requests = split_train_val(load_requests(data), val_size)
        else:
            train_requests, val_requests = load_requests(data), load_requests(val, limit=val_size)
        train_requests = train_requests[:limit]
        if wiki is not None:
            sentences = wiki_sentences(wiki)
            held_out = max(len(sentences) // 10, 1)
            train_texts, val_texts = sentences[:-held_out], sentences[-held_out:]
        else:
            train_texts = val_texts = default_locality_texts()
        model, tokenizer = _load(model_name)
        seq2seq = is_seq2seq(model)
        config = cls.Config(**{k: v for k, v in overrides.items() if k in method_keys})
        editor = cls.for_training(model, tokenizer, config)
        batches = EditBatches(
            tokenizer, train_requests, edits_per_batch, train_texts, texts_per_batch, seed, seq2seq
        )
        val_batches = validation_batches(tokenizer, val_requests, val_texts, texts_per_batch, seq2seq)
        console.print(
            f"training {method} on {len(train_requests)} edits ({edits_per_batch} per batch), "
            f"validating on {len(val_requests)}; {train_config}",
            highlight=False,
        )
        metrics = train_editor(editor, batches.__getitem__, val_batches, train_config, out, resume=resume)
        hparams = dataclasses.asdict(editor.config)
        metrics |= {"method": method, "model": model_name, "data": str(data), "hparams": hparams}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
        table = Table(title=f"{method}: best validation (step {(metrics['best_val'] or {}).get('step')})")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in (metrics["best_val"] or {}).items():
            table.add_row(key, f"{value:.4g}")
        console.print(table)
        console.print(
            f"{metrics['steps']} steps in {metrics['seconds']:.0f} s ({metrics['stop_reason']}), "
            f"peak RSS {metrics['peak_rss_mb']:.0f} MB; editor, curves.png and metrics.json in {out}",
            highlight=False,
        )

    _run(body)


if __name__ == "__main__":
    app()
