"""The CLI end to end on a tiny local model: eval/edit write what they promise; bad input gets one line."""

from __future__ import annotations

import json

import pytest
from conftest import char_tokenizer, tiny_model
from typer.testing import CliRunner

from modeledit import Patch
from modeledit.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "edits.jsonl"
    records = [
        {
            "prompt": "The capital of {} is",
            "subject": s,
            "target_new": t,
            "target_true": "Paris",
            "paraphrase_prompts": [f"{s}'s capital city is"],
            "neighborhood_prompts": ["The capital of France is"],
        }
        for s, t in [("Zorbia", "Quux"), ("Ylland", "Blip"), ("Xer", "Mop")]
    ]
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


@pytest.mark.parametrize("mode,batch", [("single", 1), ("batch", 2), ("sequential", 1)])
def test_eval_writes_summary_with_documented_keys(model_dir, data_file, tmp_path, mode, batch):
    out = tmp_path / "out.json"
    result = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(model_dir),
            "--method",
            "ft",
            "--data",
            str(data_file),
            "--mode",
            mode,
            "--batch-size",
            str(batch),
            "--set",
            "steps=3",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())["summary"]
    for key in (
        "ES",
        "PS",
        "NS",
        "S",
        "EM",
        "PM",
        "NM",
        "n",
        "seconds_per_edit",
        "seconds_fwd_bwd",
        "edit_cost_ratio",
    ):
        assert key in summary, key
    assert summary["n"] == 3
    assert 0 <= summary["ES"] <= 100 and summary["seconds_fwd_bwd"] > 0


def test_eval_none_scores_unedited_model(model_dir, data_file, tmp_path):
    out = tmp_path / "none.json"
    result = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(model_dir),
            "--method",
            "none",
            "--data",
            str(data_file),
            "--limit",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["summary"]["n"] == 2 and "seconds_per_edit" not in data["summary"]
    assert data["summary"]["NS"] == data["summary"]["NS_before"]


def test_edit_saves_a_loadable_patch(model_dir, tmp_path):
    out = tmp_path / "p.safetensors"
    result = runner.invoke(
        app,
        [
            "edit",
            "--model",
            str(model_dir),
            "--method",
            "ft",
            "--prompt",
            "The capital of {} is",
            "--subject",
            "Zorbia",
            "--target",
            "Quux",
            "--set",
            "steps=2",
            "--save",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert Patch.load(out).method == "ft"


EDIT_FT = ["edit", "--model", "MODEL", "--method", "ft", "--prompt", "The capital of {} is"]
EDIT_FT += ["--subject", "Zorbia", "--target", "Quux"]


def test_a_failed_edit_save_leaves_no_partial_file(model_dir, tmp_path, monkeypatch):
    import errno

    from modeledit import patch as patch_module

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a patch")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(patch_module, "save_file", disk_full)
    args = [str(model_dir) if a == "MODEL" else a for a in EDIT_FT]
    result = runner.invoke(app, [*args, "--set", "steps=2", "--save", str(tmp_path / "p.safetensors")])
    assert result.exit_code == 2 and "No space left on device" in result.output, result.output
    assert list(tmp_path.iterdir()) == []  # no p.safetensors.partial


@pytest.mark.parametrize(
    "args,message",
    [
        (["eval", "--model", "no/such-model-xyz", "--method", "ft", "--data", "DATA"], "unknown model"),
        (["eval", "--model", "MODEL", "--method", "nope", "--data", "DATA"], "unknown method"),
        (["eval", "--model", "MODEL", "--method", "ft", "--data", "/no/such/file.json"], "cannot read"),
        (
            ["eval", "--model", "MODEL", "--method", "ft", "--data", "DATA", "--set", "bogus=1"],
            "unknown hyperparameter",
        ),
        (["eval", "--model", "MODEL", "--method", "ft", "--data", "DATA", "--mode", "weird"], "unknown mode"),
        (["edit", "--model", "MODEL", "--prompt", "Hello", "--target", "  "], "target_new"),
        # hyperparameters out of their type or range: one line, before any edit work (issue 36)
        ([*EDIT_FT, "--set", "steps=abc"], "ft: steps must be an integer >= 1, got 'abc'"),
        ([*EDIT_FT, "--set", "lr=nan"], "ft: lr must be a finite number > 0, got 'nan'"),
        ([*EDIT_FT, "--set", "lr=NaN"], "ft: lr must be a finite number > 0, got nan"),
        ([*EDIT_FT, "--set", "steps=-1"], "ft: steps must be an integer >= 1, got -1"),
        ([*EDIT_FT, "--set", "steps=2.5"], "ft: steps must be an integer >= 1, got 2.5"),
        ([*EDIT_FT, "--set", "norm_constraint=0"], "norm_constraint must be a finite number > 0 or null"),
        ([*EDIT_FT[:6], "The {} capital of {} is {x}", *EDIT_FT[7:]], "braces may appear only once"),
        (["eval", "--model", "MODEL", "--method", "ft", "--data", "DATA", "--limit", "0"], "--limit >= 1"),
        (["eval", "--model", "MODEL", "--method", "ft", "--data", "DATA", "--offset", "-1"], "--offset must"),
    ],
)
def test_bad_input_is_one_clear_line(model_dir, data_file, args, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = [str(model_dir) if a == "MODEL" else str(data_file) if a == "DATA" else a for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_editor_folder_is_the_classifier_for_serac_and_the_editor_otherwise(tmp_path):
    from modeledit.cli import _editor_setting

    assert _editor_setting("serac", tmp_path) == [f"classifier_path={tmp_path}"]
    assert _editor_setting("mend", tmp_path) == [f"editor_path={tmp_path}"]
    assert _editor_setting("mend", None) == []
    with pytest.raises(ValueError, match="no such folder"):
        _editor_setting("serac", tmp_path / "missing")


def test_edit_that_does_not_hold_says_so_and_require_hold_exits_1(model_dir, tmp_path):
    """A deliberately too weak edit (one tiny step) on a tiny model: "does NOT hold", exit 1, no file."""
    out = tmp_path / "p.safetensors"
    args = [str(model_dir) if a == "MODEL" else a for a in EDIT_FT]
    result = runner.invoke(
        app, [*args, "--set", "steps=1", "--set", "lr=1e-9", "--require-hold", "--save", str(out)]
    )
    assert result.exit_code == 1, result.output
    assert "the edit does NOT hold" in result.output and not out.exists()
    result = runner.invoke(app, [*args, "--set", "steps=1", "--set", "lr=1e-9", "--save", str(out)])
    assert result.exit_code == 0, result.output
    assert "saved patch" in result.output and "does NOT hold" in result.output
    assert Patch.load(out).info["verify"]["holds"] is False


def test_chat_without_a_chat_template_is_one_clear_line(model_dir):
    args = [str(model_dir) if a == "MODEL" else a for a in EDIT_FT]
    result = runner.invoke(app, [*args, "--chat"])
    assert result.exit_code == 2, result.output
    assert "no chat template" in result.output and "Traceback" not in result.output


def test_eval_forms_rejects_an_unknown_form_before_loading(data_file):
    result = runner.invoke(
        app,
        ["eval", "--model", "no/such", "--method", "ft", "--data", str(data_file), "--forms", "plain,poem"],
    )
    assert result.exit_code == 2 and "--forms" in result.output


def test_editor_setting_in_a_fresh_process(tmp_path):
    """The registry is filled before it is read: serac's --editor is its classifier in a new process too."""
    import subprocess
    import sys

    code = (
        "import pathlib; from modeledit.cli import _editor_setting; "
        f"print(_editor_setting('serac', pathlib.Path({str(tmp_path)!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert f"classifier_path={tmp_path}" in out


def test_train_with_question_forms_uses_each_edit_in_each_form(model_dir, tmp_path):
    """`train --forms plain,question`: every CounterFact edit also as its question (a tiny MEND run)."""
    records = [
        {
            "case_id": i,
            "prompt": f"The mother tongue of {s} is",
            "subject": s,
            "target_new": "Xy",
            "ground_truth": "Zw",
            "rephrase_prompt": f"{s} is a native speaker of",
            "locality_prompt": "The mother tongue of Ab is",
            "locality_ground_truth": "Zw",
        }
        for i, s in enumerate(["Cd", "Ef", "Gh", "Ij", "Kl"])
    ]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    args = ["train", "mend", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "ed")]
    result = runner.invoke(app, [*args, "--val-size", "1", "--steps", "2", "--forms", "plain,question"])
    assert result.exit_code == 0, result.output
    assert "training mend on 8 edits" in result.output and "validating on 2" in result.output


# -- argument errors before the model loads; prompts checked before any generation (issue 36) ---------------

NO_MODEL = "no/such-model-xyz"  # loading it would fail: each error below must come first
EDIT_NO_MODEL = [NO_MODEL if a == "MODEL" else a for a in EDIT_FT]
EVAL_NO_MODEL = ["eval", "--model", NO_MODEL, "--method", "ft", "--data", "DATA"]
TRAIN_NO_MODEL = ["train", "mend", "--model", NO_MODEL, "--data", "DATA", "--out", "TMP"]


@pytest.mark.parametrize(
    "args,message",
    [
        ([*EDIT_NO_MODEL[:4], "nope", *EDIT_NO_MODEL[5:]], "unknown method 'nope'; available: default"),
        ([*EDIT_NO_MODEL, "--set", "bogus=1"], "ft: unknown hyperparameter(s) ['bogus']"),
        ([*EDIT_NO_MODEL, "--set", "steps=-1"], "ft: steps must be an integer >= 1, got -1"),
        ([*EDIT_NO_MODEL[:6], "The {} capital of {} is {x}", *EDIT_NO_MODEL[7:]], "field 'prompt': braces"),
        ([*EDIT_NO_MODEL, "--save", "TMP"], "is a folder; give the patch's file name"),
        ([*EDIT_NO_MODEL, "--unrelated", "  "], "--unrelated: each prompt must be a non-empty string"),
        ([*EDIT_NO_MODEL[:4], "rome", "--prompt", "Hello", "--target", "x"], "method needs the subject"),
        ([*EVAL_NO_MODEL, "--set", "lr=0"], "ft: lr must be a finite number > 0, got 0"),
        ([*EVAL_NO_MODEL, "--set", "bogus=1"], "ft: unknown hyperparameter(s) ['bogus']"),
        ([*EVAL_NO_MODEL, "--batch-size", "0"], "--batch-size must be >= 1"),
        ([*TRAIN_NO_MODEL, "--set", "steps=0"], "train: steps must be an integer >= 1, got 0"),
        ([*TRAIN_NO_MODEL, "--limit", "0"], "--limit, --val-size and --edits-per-batch must be >= 1"),
        ([*TRAIN_NO_MODEL, "--init", "TMP"], "no trained mend editor (mend.json missing)"),
        (["serve", "--model", NO_MODEL, "--db", "TMP", "--port", "70000"], "--port 70000: use 0 to 65535"),
        (["serve", "--model", NO_MODEL, "--db", "TMP"], "is a directory; give the ledger's database file"),
        (["serve", "--model", NO_MODEL, "--db", "FOREIGN"], "an SQLite database of another application"),
        (["ledger", "list", "--db", "FOREIGN", "--state", "x"], "an SQLite database of another application"),
    ],
)
def test_argument_errors_come_before_the_model_loads(data_file, tmp_path, monkeypatch, args, message):
    import sqlite3

    import modeledit.cli as cli

    def no_loading(name):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "_load", no_loading)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    foreign = tmp_path / "other.db"
    sqlite3.connect(foreign).execute("CREATE TABLE t (x)").connection.close()
    names = {"DATA": str(data_file), "TMP": str(tmp_path), "FOREIGN": str(foreign)}
    result = runner.invoke(app, [names.get(a, a) for a in args])
    output = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 2 and message in output, (result.output, result.exception)
    assert "Traceback" not in result.output


def test_an_over_context_prompt_is_refused_before_any_generation(model_dir, data_file, tmp_path, monkeypatch):
    """The tiny model reads 128 positions (one per character); a 9,000-word prompt used to be answered,
    token by token, before the edit found it too long."""
    import modeledit.verify as verify

    def no_generation(*args, **kwargs):
        raise AssertionError("generated")

    monkeypatch.setattr(verify, "generate_answers", no_generation)
    long = " ".join(["word"] * 9000)
    args = [str(model_dir) if a == "MODEL" else a for a in EDIT_FT]
    result = runner.invoke(app, [*args[:6], long + " {}", *args[7:]])
    output = " ".join(result.output.split())
    assert result.exit_code == 2, output[-500:]
    assert "field 'prompt': is 45011 tokens with its target, longer than the model context (128)" in output
    result = runner.invoke(app, [*args, "--unrelated", long])
    output = " ".join(result.output.split())
    assert result.exit_code == 2, output
    assert "--unrelated prompt 1 is 44999 tokens and 32 to generate, longer than the model context" in output
    # eval: the record is named; --skip-invalid leaves it out and evaluates the rest
    records = [json.loads(line) for line in data_file.read_text().splitlines()]
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [records[0] | {"prompt": long + " {}"}, records[1]]))
    eval_args = ["eval", "--model", str(model_dir), "--method", "none", "--data", str(path), "--no-gen"]
    result = runner.invoke(app, eval_args)
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "record 0, field 'prompt': is 45011 tokens" in output, output[-500:]
    monkeypatch.undo()
    result = runner.invoke(app, [*eval_args, "--skip-invalid", "--out", str(tmp_path / "out.json")])
    output = " ".join(result.output.split())
    assert result.exit_code == 0 and "skipped record 0" in output, output
    assert json.loads((tmp_path / "out.json").read_text())["summary"]["n"] == 1
