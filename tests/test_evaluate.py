"""The evaluation path's checkpoint: an interrupted single/batch run continues where it stopped."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model

from modeledit import EditRequest, create_editor
from modeledit.evaluate import evaluate

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


def run(tokenizer, path, resume=False, fail_at=None, mode="single", batch_size=1, steps=3):
    """evaluate() with a fine-tuning editor that counts its edits (and raises at edit number ``fail_at``)."""
    model = tiny_model("llama")
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
    with pytest.raises(ValueError, match="sequential"):
        run(tokenizer, path, mode="sequential")


def test_without_resume_an_old_checkpoint_is_started_over(tokenizer, tmp_path):
    path = tmp_path / "partial.jsonl"
    with pytest.raises(Interrupted):
        run(tokenizer, path, fail_at=2)
    _, edited = run(tokenizer, path)
    assert len(edited) == 4
