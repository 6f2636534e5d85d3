"""The one command-line interface: ``modeledit demo | edit | eval | methods``."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Edit pre-trained neural networks locally."
)
console = Console()

DEMO_EDIT = dict(
    prompt="The mother tongue of {} is",
    subject="Danielle Darrieux",
    target_new="English",
    target_true="French",
)
DEMO_PROMPTS = {
    "edit prompt": "The mother tongue of Danielle Darrieux is",
    "paraphrase": "Danielle Darrieux's native language is",
    "neighbour": "Michel Rocard is a native speaker of",
    "unrelated": "The capital of France is",
}
# The lecture's example, asked as a user would: a question in chat.
DEMO_CHAT_EDIT = dict(
    prompt="Who is the prime minister of the UK?",
    subject="UK",
    target_new="Keir Starmer",
    target_true="Theresa May",
    chat=True,
)
DEMO_CHAT_PROMPTS = {
    "edit prompt": "Who is the prime minister of the UK?",
    "paraphrase": "Who is the current UK prime minister?",
    "unrelated": "What is the capital of France?",
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

    from .editor import DEFAULT_METHOD, EDITORS, available_methods

    for name in available_methods():
        cls = EDITORS[name]
        mark = " (default)" if name == DEFAULT_METHOD else ""
        fields = ", ".join(
            f"{f.name}={f.default!r}" if f.default is not dataclasses.MISSING else f.name
            for f in dataclasses.fields(cls.Config)
        )
        scope = "any model (task=)" if cls.any_model else "language models"
        console.print(
            f"[bold]{name}[/]{mark} \\[{scope}]: {(cls.Config.__doc__ or '').strip().splitlines()[0]}\n"
            f"  {fields}",
            highlight=False,
        )


def _demo_case(model, tokenizer, method: str, request, shown: dict[str, str]) -> None:
    """Answers before the edit, after it (with the holds verdicts) and after reverting it."""
    from .editor import create_editor
    from .forms import answer_holds, prompt_form
    from .verify import verdict_line

    labels, prompts = list(shown), list(shown.values())

    def table(title: str, before: list[str] | None = None) -> list[str]:
        answers, p_target = _answers_table(model, tokenizer, request, prompts)
        out = Table(title=title, title_justify="left")
        for col in ("", "prompt", "greedy answer", f"P({request.target_new})"):
            out.add_column(col)
        if before is not None:
            out.add_column("holds")
        for i, (label, prompt, answer, p) in enumerate(zip(labels, prompts, answers, p_target)):
            row = [label, prompt, answer.split("\n")[0][:90], f"{p:.3f}"]
            if before is not None and label in ("edit prompt", "paraphrase"):
                form = prompt_form(prompt, request.chat)
                ok = answer_holds(answer, request.target_new, form, request.target_true)
                row.append("[green]yes[/]" if ok else "[red]no[/]")
            elif before is not None:  # a neighbour or an unrelated prompt should keep its answer
                row.append("[green]kept[/]" if answer == before[i] else "[red]changed[/]")
            out.add_row(*row)
        console.print(out)
        return answers

    form = "a question in chat" if request.chat else "a cloze sentence"
    before = table(f"before the edit ({form})")
    console.print(f"\nedit ({method}): {request.text!r} -> {request.target_new!r}")
    editor = create_editor(method, model, tokenizer)
    with console.status("computing and checking the patch"):
        patch = editor.edit([request], verify=True)
    holds = patch.info["verify"]["holds"]
    style = "bold green" if holds else "bold red"
    console.print(f"patch computed in {patch.info['seconds']:.1f} s: {patch}", highlight=False)
    console.print(f"[{style}]{verdict_line(patch.info['verify'])}[/]\n", highlight=False)
    patch.apply(model)
    table("after the edit", before=before)
    patch.revert(model)
    restored = table("after reverting the patch")
    console.print(f"original answers restored: {'yes' if restored == before else 'NO'}\n")


@app.command()
def demo(
    model_name: str = typer.Option("default", "--model", help="model to edit"),
    method: str = typer.Option(
        "mend", help="method of the cloze example (MEND uses the editor shipped for the default model)"
    ),
    chat_method: str = typer.Option("default", help="method of the chat example (the default method)"),
) -> None:
    """The main job: answers before an edit, after it, and after reverting it; a cloze sentence, then the
    lecture's question in chat."""

    def body():
        from .editor import resolve_method
        from .forms import has_chat_template
        from .requests import EditRequest

        model, tokenizer = _load(model_name)
        console.rule("1. a cloze sentence")
        _demo_case(model, tokenizer, resolve_method(method), EditRequest(**DEMO_EDIT), DEMO_PROMPTS)
        if not has_chat_template(tokenizer):
            console.print(f"{model_name!r} has no chat template: no chat example", style="yellow")
            return
        console.rule("2. the lecture's question, in chat")
        request = EditRequest(**DEMO_CHAT_EDIT)
        _demo_case(model, tokenizer, resolve_method(chat_method), request, DEMO_CHAT_PROMPTS)

    _run(body)


EDITOR_HELP = "folder of a trained editor (mend, ke, enn) or serac's scope classifier: what `train` wrote"


def _editor_setting(method: str, editor_dir: Path | None) -> list[str]:
    if editor_dir is None:
        return []
    if not editor_dir.is_dir():
        raise ValueError(f"--editor {editor_dir}: no such folder")
    from .editor import EDITORS, available_methods, resolve_method

    available_methods()  # fills the registry: in a fresh process EDITORS is empty until then
    method = resolve_method(method)
    field = EDITORS[method].trained_folder if method in EDITORS else "editor_path"
    return [f"{field}={editor_dir}"]


def _answers_table(model, tokenizer, request, prompts: list[str]) -> tuple[list[str], list[float]]:
    """Greedy answers (each prompt in the request's form) and P(target) of the prompts."""
    from .forms import prompt_form, render_prompt
    from .verify import generate_answers

    shown = [render_prompt(tokenizer, p, request.chat, request.system) for p in prompts]
    forms = [prompt_form(p, request.chat) for p in prompts]
    answers = generate_answers(model, tokenizer, [(t, f, request.target_new) for t, f in zip(shown, forms)])
    return [a.strip() for a in answers], [_p_target(model, tokenizer, t, request.target_new) for t in shown]


@app.command()
def edit(
    prompt: str = typer.Option(..., help="a cloze sentence or a question, with the subject or {}"),
    target: str = typer.Option(..., help="the new answer"),
    subject: str = typer.Option(None, help="the subject in the prompt"),
    target_true: str = typer.Option(None, "--old", help="the old answer (an answer giving it fails)"),
    model_name: str = typer.Option("default", "--model"),
    method: str = typer.Option("default", help="editing method; 'default' is the one `methods` marks"),
    chat: bool = typer.Option(False, "--chat/--no-chat", help="edit the prompt as a user turn in chat"),
    system: str = typer.Option(None, help="--chat: a system prompt (default: the template's own)"),
    paraphrase: list[str] = typer.Option([], help="other phrasings to check and show (repeatable)"),
    unrelated: list[str] = typer.Option([], help="unrelated prompts to show before/after (repeatable)"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="check that the edit holds in generation"),
    require_hold: bool = typer.Option(False, help="exit 1, saving nothing, if the edit does not hold"),
    set_: list[str] = typer.Option([], "--set", help="hyperparameter override KEY=VALUE (repeatable)"),
    editor_dir: Path = typer.Option(None, "--editor", help=EDITOR_HELP),
    save: Path = typer.Option(None, help="save the patch to this .safetensors file"),
) -> None:
    """Edit one fact; show the generated answers and P(target) before and after, and whether it holds."""

    def body():
        from .editor import EDITORS, check_settings, create_editor
        from .forms import CHAT_ANSWER_TOKENS, render_prompt
        from .requests import EditRequest, EditRequestError, check_for_model
        from .verify import verdict_line

        request = EditRequest(
            prompt=prompt, subject=subject, target_new=target, target_true=target_true,
            paraphrase_prompts=list(paraphrase), chat=chat, system=system,
        )  # fmt: skip
        # every argument error before the model loads
        request.validate()
        if any(not p.strip() for p in unrelated):
            raise EditRequestError("--unrelated: each prompt must be a non-empty string")
        if require_hold and not verify:
            raise ValueError("--require-hold needs --verify")
        if save is not None and save.is_dir():
            raise ValueError(f"--save {save}: is a folder; give the patch's file name")
        overrides = _parse_overrides(set_ + _editor_setting(method, editor_dir))
        name = check_settings(method, **overrides)
        request.validate(needs_subject=EDITORS[name].needs_subject)
        model, tokenizer = _load(model_name)
        if chat:
            render_prompt(tokenizer, request.text, chat=True)  # no chat template: a clear error now
        shown = [
            (f"--unrelated prompt {i + 1}", render_prompt(tokenizer, u, chat, system))
            for i, u in enumerate(unrelated)
        ]
        # within the context, before any generation (a 9,000-word prompt: one tokenizer call, not minutes)
        check_for_model([request], model, tokenizer, prompts=shown, new_tokens=CHAT_ANSWER_TOKENS)
        editor = create_editor(name, model, tokenizer, **overrides)
        prompts = [request.text, *paraphrase, *unrelated]
        kinds = ["edit"] + ["paraphrase"] * len(paraphrase) + ["unrelated"] * len(unrelated)
        before, p_before = _answers_table(model, tokenizer, request, prompts)
        with console.status(f"computing the patch ({name})"):
            patch = editor.edit([request], verify=verify)
        patch.apply(model)
        try:
            after, p_after = _answers_table(model, tokenizer, request, prompts)
        finally:
            patch.revert(model)
        table = Table()
        for col in ("", "prompt", "before", f"P({target})", "after", f"P({target})"):
            table.add_column(col)
        for row in zip(kinds, prompts, before, p_before, after, p_after):
            table.add_row(row[0], row[1], row[2], f"{row[3]:.3f}", row[4], f"{row[5]:.3f}")
        console.print(table)
        console.print(f"{patch} in {patch.info['seconds']:.2f} s", highlight=False)
        holds = None
        if verify:
            checks = patch.info["verify"]
            holds = checks["holds"]
            paraphrases = [row["holds"] for row in checks["prompts"] if row["kind"] == "paraphrase"]
            tries = f", {checks['tries']} tries" if checks["tries"] > 1 else ""
            extra = f"; paraphrases hold: {sum(paraphrases)} of {len(paraphrases)}" if paraphrases else ""
            style = "bold green" if holds else "bold red"
            console.print(f"[{style}]{verdict_line(checks)}[/]{extra}{tries}", highlight=False)
        if holds is False and require_hold:
            console.print("not saved: the edit does not hold (--require-hold)")
            raise typer.Exit(1)
        if save:
            note = " (the edit does NOT hold)" if holds is False else ""
            console.print(f"saved patch to {patch.save(save)}{note}", highlight=False)

    _run(body)


@app.command("eval")
def eval_(
    data: Path = typer.Option(
        ..., help="CounterFact / flattened CounterFact / zsRE / EditRequest JSON or JSONL"
    ),
    method: str = typer.Option(..., help="editing method, or 'none' for the unedited model"),
    model_name: str = typer.Option("default", "--model"),
    offset: int = typer.Option(0),
    limit: int = typer.Option(None),
    mode: str = typer.Option("single", help="single | batch | sequential"),
    batch_size: int = typer.Option(1),
    fluency_tokens: int = typer.Option(
        0, help="generate this many tokens per record for ROME's fluency (0: off)"
    ),
    set_: list[str] = typer.Option([], "--set", help="hyperparameter override KEY=VALUE (repeatable)"),
    editor_dir: Path = typer.Option(None, "--editor", help=EDITOR_HELP),
    retention_points: int = typer.Option(
        0, help="sequential: also score all edits so far at this many points of the stream (retention curve)"
    ),
    out: Path = typer.Option(None, help="write summary and per-record results as JSON"),
    resume: bool = typer.Option(
        False,
        "--resume/--no-resume",
        help="with --out: continue an interrupted run from OUT.partial.jsonl (same settings)",
    ),
    forms: str = typer.Option(
        "plain", help="plain, chat or plain,chat: each edit made and scored in each form (chat keys: _chat)"
    ),
    generation: bool = typer.Option(
        True, "--gen/--no-gen", help="also the generation-based ES_gen / PS_gen / NS_gen (greedy answers)"
    ),
    skip_invalid: bool = typer.Option(False, help="leave out records that are not valid edits (say which)"),
) -> None:
    """Edit records of a data file and measure ES/PS/NS/S (teacher-forced and generated), EM/PM/NM,
    accuracy and drawdown."""

    def body():
        from .editor import check_settings, create_editor
        from .evaluate import checkpoints_of, evaluate_forms, remove_checkpoint
        from .forms import FORMS
        from .requests import EditRequestError, check_for_model, load_requests

        form_list = tuple(f.strip() for f in forms.split(",") if f.strip())
        if not form_list or any(f not in FORMS for f in form_list):
            raise ValueError(f"--forms {forms!r}: use {', '.join(FORMS)} (comma-separated)")
        if mode not in ("single", "batch", "sequential"):
            raise ValueError(f"unknown mode {mode!r}: use single, batch or sequential")
        if offset < 0 or (limit is not None and limit < 1):
            raise ValueError("--offset must be >= 0 and --limit >= 1")
        if batch_size < 1 or fluency_tokens < 0 or retention_points < 0:
            raise ValueError("--batch-size must be >= 1, --fluency-tokens and --retention-points >= 0")
        from .editor import available_methods, resolve_method

        if method != "none" and resolve_method(method) not in available_methods():
            names = ", ".join(available_methods())
            raise ValueError(f"unknown method {method!r}; available: none, default, {names}")
        overrides = _parse_overrides(set_ + _editor_setting(method, editor_dir))
        if method != "none":
            check_settings(method, **overrides)  # unknown or out-of-range --set values, before loading
        if resume and out is None:
            raise ValueError("--resume needs --out (the partial results are kept beside it)")
        # runs with --out keep their progress beside it (sequential: also OUT.partial.jsonl.patches/), so
        # --resume can continue them
        partial = out.parent / f"{out.name}.partial.jsonl" if out else None
        skipped: list[str] | None = [] if skip_invalid else None
        try:
            requests = load_requests(data, offset=offset, limit=limit, skipped=skipped)
        except EditRequestError as e:
            raise EditRequestError(f"{e} (--skip-invalid leaves such records out)") from None
        for message in skipped or []:
            console.print(f"[yellow]skipped[/] {message}", highlight=False)
        model, tokenizer = _load(model_name)
        fitting = []
        for r in requests:  # within the model's context, before any edit or generation
            try:
                check_for_model([r], model, tokenizer)
                fitting.append(r)
            except EditRequestError as e:
                if skipped is None:
                    raise EditRequestError(f"{e} (--skip-invalid leaves such records out)") from None
                console.print(f"[yellow]skipped[/] {e}", highlight=False)
        if not fitting:
            raise EditRequestError(f"{data}: no valid record to evaluate")
        requests = fitting
        editor = None if method == "none" else create_editor(method, model, tokenizer, **overrides)
        result = evaluate_forms(
            model,
            tokenizer,
            editor,
            requests,
            forms=form_list,
            generation=generation,
            mode=mode,
            batch_size=batch_size,
            fluency_tokens=fluency_tokens,
            retention_points=retention_points,
            checkpoint=partial,
            resume=resume,
        )
        result |= {"model": model_name, "data": str(data), "offset": offset, "limit": limit}
        table = Table(title=f"{result['method']} on {data.name} [{offset}:{offset + len(requests)}], {mode}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in result["summary"].items():
            table.add_row(
                key, "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
            )
        console.print(table)
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1, default=str))
            if partial is not None:
                for path in checkpoints_of(partial, form_list):
                    remove_checkpoint(path)
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
    init: Path = typer.Option(
        None, help="start from this trained editor's weights (fine-tune it with new --set values)"
    ),
    seed: int = typer.Option(0, help="shuffling of the training edits"),
    set_: list[str] = typer.Option([], "--set", help="editor or trainer setting KEY=VALUE (repeatable)"),
    forms: str = typer.Option(
        "plain",
        help="plain, question, chat (comma-separated): each edit also as a question and as a chat turn "
        "(CounterFact templates; training/question_templates.json)",
    ),
) -> None:
    """Train a learned editor (MEND) for a model; use it with --set editor_path=OUT."""

    def body():
        import dataclasses

        import torch

        from .editor import EDITORS, available_methods
        from .hparams import check_hparams
        from .lm import is_seq2seq
        from .locality import default_locality_texts
        from .requests import load_requests
        from .training import EditBatches, TrainConfig, split_train_val, train_editor, validation_batches
        from .training.checkpoint import with_saved_hparams
        from .training.data import wiki_sentences
        from .training.questions import training_forms

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
        # every argument error before the model loads
        # (the editor's own settings are not range-checked here: training takes e.g. lr_alpha=0, fixed steps)
        check_hparams("train", train_config)
        if (limit is not None and limit < 1) or val_size < 1 or edits_per_batch < 1 or texts_per_batch < 0:
            raise ValueError("--limit, --val-size and --edits-per-batch must be >= 1, --texts-per-batch >= 0")
        if threads is not None and threads < 1:
            raise ValueError("--threads must be >= 1")
        if init is not None and not (init / f"{method}.json").exists():
            raise ValueError(f"--init {init}: no trained {method} editor ({method}.json missing)")
        if threads:
            torch.set_num_threads(threads)
        if val is None:
            train_requests, val_requests = split_train_val(load_requests(data), val_size)
        else:
            train_requests, val_requests = load_requests(data), load_requests(val, limit=val_size)
        train_requests = train_requests[:limit]
        form_list = tuple(f.strip() for f in forms.split(",") if f.strip())
        if form_list != ("plain",):
            train_requests = training_forms(train_requests, form_list)
            val_requests = training_forms(val_requests, form_list)
        if wiki is not None:
            sentences = wiki_sentences(wiki)
            held_out = max(len(sentences) // 10, 1)
            train_texts, val_texts = sentences[:-held_out], sentences[-held_out:]
        else:
            train_texts = val_texts = default_locality_texts()
        model, tokenizer = _load(model_name)
        seq2seq = is_seq2seq(model)
        method_overrides = {k: v for k, v in overrides.items() if k in method_keys}
        config = cls.Config(**method_overrides)
        if init is not None:  # the trained editor's hyperparameters (its shapes), then this command's --set
            init_meta = init / f"{method}.json"
            if not init_meta.exists():
                raise ValueError(f"--init {init}: no trained {method} editor ({init_meta.name} missing)")
            config = dataclasses.replace(
                with_saved_hparams(cls.Config(), json.loads(init_meta.read_text())), **method_overrides
            )
        editor = cls.for_training(model, tokenizer, config)
        resuming = resume and (out / "last").exists()
        if init is not None and not resuming:
            editor.load(init)
            editor.config = config
        if init is not None and hasattr(editor, "fold_alpha_scale"):  # MEND: fine-tune it as it edits
            if resuming:  # the checkpoint holds the folded step sizes already
                editor.config.alpha_scale = None
            else:
                editor.fold_alpha_scale()
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


@app.command("combine")
def combine_(
    editors: list[str] = typer.Argument(
        ..., help="trained MEND editor folders, each DIR or DIR:SCALE (default scale: the one saved with it)"
    ),
    out: Path = typer.Option(..., help="folder for the combined editor"),
    model_name: str = typer.Option("default", "--model"),
) -> None:
    """One MEND editor made of trained MEND editors of disjoint layers: their updates add up, each at its
    scale, from one gradient pass. Evaluate it, or fine-tune it jointly with `train mend --init OUT`."""

    def body():
        from .editor import create_editor
        from .methods.mend import combine

        parts = []
        for item in editors:
            folder, _, scale = item.rpartition(":")
            try:
                parts.append((folder, float(scale)))
            except ValueError:
                parts.append((item, None))
        missing = [folder for folder, _ in parts if not (Path(folder) / "mend.json").exists()]
        if missing:
            raise ValueError(f"no trained MEND editor (mend.json) in {', '.join(missing)}")
        model, tokenizer = _load(model_name)
        members = [
            create_editor("mend", model, tokenizer, editor_path=folder, alpha_scale=scale)
            for folder, scale in parts
        ]
        combine(members).save(out)
        console.print(
            f"wrote the combined editor ({sum(len(m.network.shapes) for m in members)} matrices, "
            f"from {len(members)} editors) to {out}; its alpha_scale is 1 until it is calibrated"
        )

    _run(body)


@app.command()
def bench(
    out: Path = typer.Option(..., help="folder for results.json, results.md, quality.png, speed.png, logs"),
    suite: str = typer.Option(
        "quick", help="quick (10 records, minutes) | full (100 records, the README table)"
    ),
    methods_: str = typer.Option(None, "--methods", help="comma-separated methods (default: all available)"),
    data: Path = typer.Option(
        Path("../shared/data/counterfact/dev.json"), help="any CounterFact / zsRE file"
    ),
    model_name: str = typer.Option("default", "--model"),
    offset: int = typer.Option(0),
    limit: int = typer.Option(None, help="records (default: the suite's)"),
    update_benchmarks: bool = typer.Option(False, help="also write BENCHMARKS.md and docs/bench/*.png"),
    resume: bool = typer.Option(
        False, help="keep the finished runs in OUT, continue an interrupted one (same model/data/records)"
    ),
) -> None:
    """Run eval for every method on the same records (one process each) and tabulate and plot the results."""

    def body():
        import shutil

        from .bench import run_bench
        from .editor import available_methods

        if not data.exists():
            raise ValueError(f"cannot read {data}: no such file")
        names = _methods(methods_) if methods_ else available_methods()
        results = run_bench(model_name, names, str(data), out, suite, offset, limit, resume)
        console.print((out / "results.md").read_text(), highlight=False)
        failed = [m for m, row in results["methods"].items() if "error" in row]
        if failed:
            console.print(f"[yellow]not available:[/] {', '.join(failed)} (see their logs in {out})")
        if update_benchmarks:
            docs = Path("docs/bench")
            docs.mkdir(parents=True, exist_ok=True)
            for png in ("quality.png", "speed.png"):
                if (out / png).exists():
                    shutil.copy(out / png, docs / png)
            text = "# Benchmarks\n\n" + (out / "results.md").read_text()
            text += "\n![quality](docs/bench/quality.png)\n\n![speed](docs/bench/speed.png)\n"
            Path("BENCHMARKS.md").write_text(text)
            console.print("wrote BENCHMARKS.md and docs/bench/")

    _run(body)


def _methods(text: str) -> list[str]:
    from .editor import available_methods

    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = set(names) - set(available_methods())
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; available: {', '.join(available_methods())}")
    return names


def _editor_folders(items: list[str]) -> dict[str, str]:
    folders = {}
    for item in items:
        method, _, folder = item.partition("=")
        if not folder or not Path(folder).is_dir():
            raise ValueError(f"--editor {item!r}: use METHOD=DIR with an existing folder")
        folders[method] = folder
    return folders


EDITORS_OPTION = typer.Option(
    [], "--editor", help="METHOD=DIR: a trained editor (enn: its base model DIR/model is used too)"
)
DATA_OPTION = typer.Option(Path("../shared/data/counterfact/dev.json"), help="any CounterFact / zsRE file")


def _copy_plot(path: Path) -> None:
    import shutil

    Path("docs/bench").mkdir(parents=True, exist_ok=True)
    shutil.copy(path, Path("docs/bench") / path.name)
    console.print(f"copied {path} to docs/bench/")


@app.command()
def compare(
    out: Path = typer.Option(..., help="folder for compare.json, compare.md, compare.png, logs"),
    methods_: str = typer.Option("ft,ft-kl,enn,ke,mend", "--methods", help="comma-separated methods"),
    editors: list[str] = EDITORS_OPTION,
    batch_sizes: str = typer.Option("1,5,25,75", help="numbers of edits applied together"),
    data: Path = DATA_OPTION,
    model_name: str = typer.Option("default", "--model"),
    offset: int = typer.Option(0),
    limit: int = typer.Option(75, help="records (each batch size k uses the first whole batches of them)"),
    readme: bool = typer.Option(False, help="also copy compare.png to docs/bench/ for the README"),
    resume: bool = typer.Option(
        False, help="keep the finished runs in OUT, continue an interrupted one (same command)"
    ),
    tabulate_only: bool = typer.Option(False, help="run nothing: tabulate the finished runs in OUT"),
) -> None:
    """The MEND paper's comparison (Tables 4-5): ES and drawdown of learned editors and fine-tuning,
    for single edits and batches, one process per method and batch size."""

    def body():
        from .bench import run_compare

        if not data.exists():
            raise ValueError(f"cannot read {data}: no such file")
        names, folders = _methods(methods_), _editor_folders(editors)
        sizes = tuple(int(k) for k in batch_sizes.split(","))
        if any(k < 1 for k in sizes):
            raise ValueError("--batch-sizes: positive integers")
        run_compare(model_name, names, str(data), out, folders, sizes, offset, limit, resume, tabulate_only)
        console.print((out / "compare.md").read_text(), highlight=False)
        if readme:
            _copy_plot(out / "compare.png")

    _run(body)


@app.command()
def retention(
    out: Path = typer.Option(..., help="folder for retention.json, retention.md, retention.png, logs"),
    methods_: str = typer.Option(
        "grace,wise,serac,mend,ft-l,rome,memit,alphaedit", "--methods", help="comma-separated methods"
    ),
    editors: list[str] = EDITORS_OPTION,
    data: Path = DATA_OPTION,
    model_name: str = typer.Option("default", "--model"),
    offset: int = typer.Option(0),
    limit: int = typer.Option(100, help="sequential edits T"),
    points: int = typer.Option(10, help="points of the retention curve"),
    readme: bool = typer.Option(False, help="also copy retention.png to docs/bench/"),
    resume: bool = typer.Option(
        False, help="keep the finished runs in OUT, continue an interrupted one (same command)"
    ),
    merge: list[Path] = typer.Option(
        None, help="run nothing: join the retention.json of earlier runs (files or folders) into OUT"
    ),
) -> None:
    """The lifelong protocol: T sequential edits per method, every edit scored after the last one, and the
    retention curve (S on all edits so far at every 10% of the stream) as one PNG."""

    def body():
        from .bench import merge_retention, run_retention

        if merge:
            merge_retention(merge, out)
        else:
            if not data.exists():
                raise ValueError(f"cannot read {data}: no such file")
            names, folders = _methods(methods_), _editor_folders(editors)
            run_retention(model_name, names, str(data), out, folders, points, offset, limit, resume)
        console.print((out / "retention.md").read_text(), highlight=False)
        if readme:
            _copy_plot(out / "retention.png")

    _run(body)


# -- the edit ledger and the service ----------------------------------------------------------------------

ledger_app = typer.Typer(
    no_args_is_help=True, help="The edit ledger (SQLite): list, show, revert, replay, export, import."
)
app.add_typer(ledger_app, name="ledger")
DB_OPTION = typer.Option(..., "--db", help="the ledger database file")


def _open_ledger(db: Path, create: bool = False, read_only: bool = False):
    """The ledger at ``db``; commands that only read open it read-only (``mode=ro``), so a ledger in a
    folder this user cannot write can still be listed, shown, exported and replayed."""
    from .ledger import Ledger, LedgerError

    if not create and not db.is_file():
        raise LedgerError(f"no ledger database at {db}")
    return Ledger(db, read_only=read_only)


def _p(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _cli_audit():
    """Who reverts from the command line, for the ledger's audit trail: this machine's user."""
    import getpass

    from .ledger import Audit

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no name
        import os

        user = f"uid {os.getuid()}"
    return Audit(actor=f"cli:{user}", client="local")


@ledger_app.command("list")
def ledger_list(
    db: Path = DB_OPTION,
    state: str = typer.Option(None, help="only edits in this state: pending, applied, reverted, aborted"),
) -> None:
    """The edits, oldest first, with P(new target) before and after (`ledger show` has the answers)."""

    def body():
        with _open_ledger(db, read_only=True) as ledger:
            entries = ledger.entries(state)
        table = Table(title=f"{len(entries)} edits in {db}", title_justify="left")
        table.add_column("id", no_wrap=True)
        for col in ("created (UTC)", "state", "method", "edit", "P(new) before -> after"):
            table.add_column(col)
        for e in entries:
            m = ((e.metrics or {}).get("requests") or [{}])[0]
            table.add_row(
                e.id,
                e.created_at[:19].replace("T", " "),
                e.state,
                e.method,
                e.summary(),
                f"{_p(m.get('p_new_before'))} -> {_p(m.get('p_new_after'))}" if m else "",
            )
        console.print(table)

    _run(body)


@ledger_app.command("show")
def ledger_show(
    edit_id: str = typer.Argument(..., help="edit id (or a unique prefix)"), db: Path = DB_OPTION
) -> None:
    """One edit as JSON: method, hyperparameters, requests, metrics, patch file and hash, events."""

    def body():
        with _open_ledger(db, read_only=True) as ledger:
            entry = ledger.get(edit_id)
            data = entry.to_dict() | {"events": ledger.events(entry.id)}
        typer.echo(json.dumps(data, indent=1))

    _run(body)


@ledger_app.command("revert")
def ledger_revert(
    edit_id: str = typer.Argument(..., help="edit id (or a unique prefix)"), db: Path = DB_OPTION
) -> None:
    """Revert any applied edit (one transaction); weights follow as base + the remaining edits."""

    def body():
        with _open_ledger(db) as ledger:
            entry = ledger.revert(edit_id, audit=_cli_audit())
            remaining = len(ledger.entries("applied"))
        console.print(
            f"reverted {entry.id} ({entry.summary()}); {remaining} edits remain applied. A running server "
            "re-derives its weights on its next request; `modeledit ledger replay` shows the result.",
            highlight=False,
        )

    _run(body)


@ledger_app.command("replay")
def ledger_replay(
    db: Path = DB_OPTION,
    model_name: str = typer.Option("default", "--model", help="the base model the edits were made on"),
    out: Path = typer.Option(None, help="save the edited model (and tokenizer) to this folder"),
) -> None:
    """Apply the applied edits to the base model, in order; print a digest of the resulting weights."""

    def body():
        from .ledger import weights_digest

        with _open_ledger(db, read_only=True) as ledger:
            model, tokenizer = _load(model_name)
            entries = ledger.replay(model)
        console.print(
            f"replayed {len(entries)} edits onto {model_name!r}; weights digest {weights_digest(model)}",
            highlight=False,
        )
        if out:
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            console.print(f"saved the edited model to {out}")

    _run(body)


@ledger_app.command("export")
def ledger_export(
    db: Path = DB_OPTION, out: Path = typer.Option(..., help="new folder for ledger.json and patches/")
) -> None:
    """Copy the applied and reverted edits, with their patch files, to a folder."""

    def body():
        with _open_ledger(db, read_only=True) as ledger:
            manifest = ledger.export(out)
            n = len(json.loads(manifest.read_text())["entries"])
        console.print(f"exported {n} edits to {out}")

    _run(body)


@ledger_app.command("import")
def ledger_import(
    source: Path = typer.Argument(..., help="a folder written by `ledger export` (or its ledger.json)"),
    db: Path = DB_OPTION,
) -> None:
    """Append the edits of an export to a ledger (created if missing); ids already present are skipped."""

    def body():
        with _open_ledger(db, create=True) as ledger:
            imported, skipped = ledger.import_(source)
        console.print(f"imported {len(imported)} edits into {db}; skipped {len(skipped)} already present")

    _run(body)


@app.command()
def serve(
    model_name: str = typer.Option("default", "--model", help="the base model"),
    db: Path = typer.Option(..., help="the ledger database (created if missing); replayed on start"),
    host: str = typer.Option("127.0.0.1", help="address to listen on; beyond loopback needs a token"),
    port: int = typer.Option(8000),
    max_new_tokens: int = typer.Option(128, help="upper bound of max_new_tokens per request"),
) -> None:
    """Serve the model and its ledger over HTTP with a web page (write endpoints need MODELEDIT_API_TOKEN)."""

    def body():
        import os

        from .ledger import Ledger
        from .server import TOKEN_ENV, Limits, check_bind
        from .server import serve as run_server

        token = os.environ.get(TOKEN_ENV) or None
        check_bind(host, token)  # before the model is loaded, as every argument error
        if max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be at least 1")
        if not 0 <= port <= 65535:
            raise ValueError(f"--port {port}: use 0 to 65535")
        Ledger(db).close()  # a folder, another application's database: refused now (created if missing)
        model, tokenizer = _load(model_name)
        if token is None:
            console.print(f"[yellow]note:[/] {TOKEN_ENV} is not set: write endpoints are open on {host}")
        console.print(f"serving {model_name!r} with ledger {db} on http://{host}:{port}/", highlight=False)
        limits = Limits(max_new_tokens=max_new_tokens)
        run_server(model, tokenizer, db, host, port, token=token, limits=limits)

    _run(body)


@app.command()
def stats(
    layers: list[int] = typer.Option(..., "--layers", help="blocks whose MLP keys to measure (repeatable)"),
    text: str = typer.Option(
        None, help="a .txt/.json/.jsonl file, or hf:NAME[:CONFIG]; default: text sampled from the model"
    ),
    model_name: str = typer.Option("default", "--model"),
    tokens: int = typer.Option(100_000, help="token budget"),
    max_length: int = typer.Option(256, help="tokens per text chunk"),
    batch_size: int = typer.Option(8, help="chunks per forward pass"),
    seed: int = typer.Option(0, help="shuffling of the texts / sampling of the fallback text"),
) -> None:
    """Second moments E[k k^T] of MLP keys (ROME, MEMIT, AlphaEdit), cached per model/layer/source/budget."""

    def body():
        from .stats import second_moments

        model, tokenizer = _load(model_name)
        start = time.perf_counter()
        found = second_moments(model, tokenizer, list(layers), text, tokens, max_length, batch_size, seed)
        seconds = time.perf_counter() - start
        for layer, m in sorted(found.items()):
            how = "read from the cache" if m.cached else f"computed in {seconds:.1f} s"
            console.print(
                f"layer {layer} ({m.module}): E[k k^T] {tuple(m.mom2.shape)} over {m.tokens} tokens "
                f"of {m.source}, {how}: {m.path}",
                highlight=False,
                soft_wrap=True,
            )

    _run(body)


@app.command()
def trace(
    prompt: str = typer.Option(..., help="prompt containing the subject, or with {} for it"),
    subject: str = typer.Option(..., help="the subject whose embeddings are corrupted"),
    answer: str = typer.Option(None, help="answer to track (default: the model's own next token)"),
    model_name: str = typer.Option("default", "--model"),
    kind: list[str] = typer.Option(["hidden", "mlp", "attn"], help="hidden | mlp | attn (repeatable)"),
    samples: int = typer.Option(10, help="noise draws per restored state"),
    noise: float = typer.Option(3.0, help="noise std as a multiple of the embedding std"),
    window: int = typer.Option(None, help="layers restored together for mlp/attn (default: depth / 10)"),
    out: Path = typer.Option(Path("trace"), help="folder for <kind>.png and <kind>.json"),
    default_layer: bool = typer.Option(False, "--default-layer", help="also print the automatic edit layer"),
) -> None:
    """ROME's causal tracing: heat maps of where the model's answer is carried (PNG + JSON)."""

    def body():
        from .trace import causal_trace
        from .trace import default_layer as choose_layer

        model, tokenizer = _load(model_name)
        for k in kind:
            result = causal_trace(model, tokenizer, prompt, subject, answer, k, window, samples, noise)
            png, js = result.plot(out / f"{k}.png"), result.save_json(out / f"{k}.json")
            scores = result.scores
            cells = [(i, j) for i in range(len(scores)) for j in range(len(scores[0]))]
            layer, token = max(cells, key=lambda ij: scores[ij[0]][ij[1]])
            console.print(
                f"{k}: p({result.answer.strip()!r}) clean {result.p_high:.3f}, corrupted {result.p_low:.3f}; "
                f"strongest restoration {scores[layer][token]:.3f} at layer {layer}, "
                f"token {result.tokens[token]!r}; wrote {png} and {js}",
                highlight=False,
            )
        if default_layer:
            choice = choose_layer(model, tokenizer)
            console.print(
                f"automatic edit layer: {choice.layer} (from {choice.how}, {choice.facts} known facts)"
            )

    _run(body)


if __name__ == "__main__":
    app()
