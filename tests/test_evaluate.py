"""The evaluation path's checkpoint: an interrupted run (single, batch or sequential) continues where it
stopped and ends as an uninterrupted one does."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from conftest import tiny_configs, tiny_model

import modeledit.evaluate
from modeledit import EditRequest, create_editor
from modeledit.evaluate import evaluate, stream_folder

REQUESTS = [
    EditRequest(
        prompt="The capital of {} is",
        subject=s,
        target_new=t,
        target_true="Paris",
        paraphrase_prompts=[f"{s}'s capital city is"],
        neighborhood_prompts=["The capital of France is"],
    )
    for s, t in [("Zorbia", "Quux"), ("Ylland", "Blip"), ("Xer", "Mop"), ("Wum", "Zed")]
]


class Interrupted(Exception):
    pass


def run(tokenizer, path, resume=False, fail_at=None, mode="single", batch_size=1, steps=3, seed=0):
    """evaluate() with a fine-tuning editor that counts its edits (and raises at edit number ``fail_at``)."""
    model = tiny_model("llama", seed=seed)
    editor = create_editor("ft", model, tokenizer, steps=steps)
    edited = []
    original = editor.edit

    def edit(requests):
        if len(edited) == fail_at:
            raise Interrupted
        edited.append([r.subject for r in requests])
        return original(requests)

    editor.edit = edit
    result = evaluate(
        model, tokenizer, editor, REQUESTS, mode=mode, batch_size=batch_size, progress=False,
        checkpoint=path, resume=resume,
    )  # fmt: skip
    return result, edited


@pytest.mark.parametrize("mode,batch_size", [("single", 1), ("batch", 2)])
def test_a_resumed_run_skips_finished_chunks_and_equals_an_uninterrupted_one(
    tokenizer, tmp_path, mode, batch_size
):
    full, _ = run(tokenizer, tmp_path / "full.jsonl", mode=mode, batch_size=batch_size)
    path = tmp_path / "partial.jsonl"
    with pytest.raises(Interrupted):
        run(tokenizer, path, fail_at=2 // batch_size, mode=mode, batch_size=batch_size)
    assert len(path.read_text().splitlines()) == 1 + 2 // batch_size  # header + finished chunks
    resumed, edited = run(tokenizer, path, resume=True, mode=mode, batch_size=batch_size)
    assert [s for chunk in edited for s in chunk] == ["Xer", "Wum"]  # only the unfinished records
    assert [r["case_id"] for r in resumed["records"]] == [r["case_id"] for r in full["records"]]
    for got, expected in zip(resumed["records"], full["records"], strict=True):
        assert got["post"] == pytest.approx(expected["post"])
    assert resumed["summary"]["n"] == 4 and resumed["summary"]["seconds_per_edit"] > 0


def test_resume_ignores_a_half_written_line_and_refuses_another_runs_checkpoint(tokenizer, tmp_path):
    path = tmp_path / "partial.jsonl"
    with pytest.raises(Interrupted):
        run(tokenizer, path, fail_at=1)
    path.write_text(path.read_text() + '{"chunk": 1, "resul')  # killed while writing
    _, edited = run(tokenizer, path, resume=True)
    assert len(edited) == 3
    header = json.loads(path.read_text().splitlines()[0])
    assert header["method"] == "ft"
    with pytest.raises(ValueError, match="different evaluation"):
        run(tokenizer, path, resume=True, steps=4)  # other settings: not the same run
    with pytest.raises(ValueError, match="different evaluation"):
        run(tokenizer, path, resume=True, mode="sequential")  # another protocol: not the same run
    with pytest.raises(ValueError, match="different evaluation"):
        run(tokenizer, path, resume=True, seed=1)  # another model
    lines = path.read_text().splitlines()
    old_header = {k: v for k, v in json.loads(lines[0]).items() if k != "model"}
    path.write_text("\n".join([json.dumps(old_header), *lines[1:]]) + "\n")
    _, edited = run(tokenizer, path, resume=True)  # a header from before it named the model: accepted
    assert edited == []


def test_without_resume_an_old_checkpoint_is_started_over(tokenizer, tmp_path):
    path = tmp_path / "partial.jsonl"
    with pytest.raises(Interrupted):
        run(tokenizer, path, fail_at=2)
    _, edited = run(tokenizer, path)
    assert len(edited) == 4


CORPUS = "\n\n".join(
    [
        "The quick brown fox jumps over the lazy dog near the river bank.",
        "Paris is the capital of France and its largest city by population.",
        "Water boils at one hundred degrees Celsius at sea level, less on a mountain top.",
    ]
)
SEQUENTIAL = {
    # AlphaEdit keeps the keys of its applied edits (editor state) and derives prefixes and C from the
    # unedited model; GRACE keeps everything in its memory patches.
    "alphaedit": dict(n_prefixes=2, prefix_tokens=3, steps=5, lr=0.5, mom2_tokens=300, weight_decay=0.0),
    "grace": dict(),
}


def run_sequential(method, tokenizer, corpus, path=None, resume=False, fail_at=None):
    config = tiny_configs()["llama"]
    config.update({"num_hidden_layers": 4})
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).float().eval()
    settings = SEQUENTIAL[method] | ({"mom2_source": corpus} if method == "alphaedit" else {})
    editor = create_editor(method, model, tokenizer, **settings)
    edited, original = [], editor.edit

    def edit(requests):
        if len(edited) == fail_at:
            raise Interrupted
        edited.append(requests[0].subject)
        return original(requests)

    editor.edit = edit
    result = evaluate(
        model, tokenizer, editor, REQUESTS, mode="sequential", progress=False, retention_points=2,
        checkpoint=path, resume=resume,
    )  # fmt: skip
    return result, edited


@pytest.mark.parametrize("method", ["alphaedit", "grace"])
def test_an_interrupted_sequential_run_resumes_from_its_saved_stream(
    method, tokenizer, tmp_path, monkeypatch
):
    monkeypatch.setenv("MODELEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(modeledit.evaluate, "SAVE_SECONDS", 0.0)  # save after every edit
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    full, _ = run_sequential(method, tokenizer, str(corpus))
    path = tmp_path / "partial.jsonl"
    with pytest.raises(Interrupted):
        run_sequential(method, tokenizer, str(corpus), path, fail_at=3)
    entries = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert "pre" in entries[0] and [e["done"] for e in entries[1:]] == [0, 1, 2]
    assert sorted(p.name for p in stream_folder(path).iterdir()) == [
        "000000.safetensors", "000001.safetensors", "000002.safetensors", "state-000002.safetensors"
    ]  # fmt: skip
    resumed, edited = run_sequential(method, tokenizer, str(corpus), path, resume=True)
    assert edited == ["Wum"]  # only the edit not saved yet
    # the same model at the end, bit for bit: every score equals the uninterrupted run's
    assert [r["post"] for r in resumed["records"]] == [r["post"] for r in full["records"]]
    assert resumed["retention"] == full["retention"]
    assert resumed["summary"]["n"] == 4 and len(resumed["retention"]) == 2


@pytest.mark.parametrize(
    "mode,batch_size,expected", [("single", 1, [0, 0, 1, 2, 3]), ("batch", 4, [0] + [0, 1, 2, 3])]
)
def test_the_reference_passes_are_timed_on_the_edited_records_just_before_their_edits(
    tokenizer, monkeypatch, mode, batch_size, expected
):
    """edit_cost_ratio compares an edit with a forward+backward of the same input under the same load: the
    reference is timed in the run, before each sampled edit (a warm-up first), and its mean is the divisor."""
    events, fwd_bwd = [], iter([9.0] + [0.1, 0.2, 0.3, 0.4])  # the warm-up's 9.0 must not count

    def timed(model, tokenizer, r):
        events.append(("reference", REQUESTS.index(r)))
        return 0.05, next(fwd_bwd)

    monkeypatch.setattr(modeledit.evaluate, "reference_seconds", timed)
    model = tiny_model("llama")
    editor = create_editor("ft", model, tokenizer, steps=1)
    original = editor.edit
    editor.edit = lambda requests: events.append(("edit", len(requests))) or original(requests)
    result = evaluate(model, tokenizer, editor, REQUESTS, mode=mode, batch_size=batch_size, progress=False)
    assert [i for kind, i in events if kind == "reference"] == expected
    first_edit = events.index(("edit", batch_size))
    assert all(kind == "reference" for kind, _ in events[:first_edit])  # timed before the edit
    summary = result["summary"]
    assert summary["seconds_fwd_bwd"] == pytest.approx(0.25) and summary["seconds_fwd"] == pytest.approx(0.05)
    assert summary["edit_cost_ratio"] == pytest.approx(summary["seconds_per_edit"] / 0.25)
