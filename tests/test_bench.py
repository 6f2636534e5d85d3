"""The benchmark harness on a tiny model and two methods: every promised file, with the documented keys."""

from __future__ import annotations

import json

from conftest import char_tokenizer, tiny_model
from typer.testing import CliRunner

import modeledit.evaluate
from modeledit.bench import SUITES, _eval_command, retention_markdown
from modeledit.cli import app
from modeledit.editor import Editor
from modeledit.evaluate import stream_folder

RECORD = {"prompt": "The capital of {} is", "target_true": "Paris", "neighborhood_prompts": ["X is in"]}
NAMES = [("Zorbia", "Quux"), ("Ylland", "Blip"), ("Wess", "Nor"), ("Vat", "Kel")]


def tiny_setup(tmp_path, kind: str = "gpt2", n: int = 2, paraphrases: bool = False):
    """A tiny model folder and a JSONL file of n edit requests."""
    model_dir = tmp_path / "tiny"
    tiny_model(kind).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "edits.jsonl"
    edits = [RECORD | {"subject": s, "target_new": t} for s, t in NAMES[:n]]
    if paraphrases:
        edits = [e | {"paraphrase_prompts": [f"{e['subject']} has the capital"]} for e in edits]
    data.write_text("\n".join(json.dumps(e) for e in edits))
    return model_dir, data


def test_bench_writes_results_tables_and_plots(tmp_path):
    model_dir, data = tiny_setup(tmp_path, paraphrases=True)
    out = tmp_path / "bench"
    result = CliRunner().invoke(
        app,
        ["bench", "--model", str(model_dir), "--methods", "ft,ft-l", "--data", str(data), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"none", "ft", "ft-l"}
    for method in ("ft", "ft-l"):
        row = results["methods"][method]
        for key in ("ES", "PS", "NS", "S", "EM", "PM", "NM", "seconds_per_edit", "edit_cost_ratio",
                    "seconds_fwd_bwd", "seconds_fwd", "peak_rss_mb"):  # fmt: skip
            assert key in row, (method, key)
        assert row["peak_rss_mb"] > 50  # the child process's own peak: a python with torch loaded
        assert row["n"] == 2
    table = (out / "results.md").read_text()
    assert "| ft-l |" in table and "Lower bounds" in table
    for png in ("quality.png", "speed.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_bench_unknown_method_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(
        app, ["bench", "--methods", "nope", "--data", __file__, "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "unknown method" in result.output


def test_compare_tabulates_success_and_drawdown_per_batch_size(tmp_path):
    model_dir, data = tiny_setup(tmp_path, n=3)
    out = tmp_path / "compare"
    args = ["compare", "--model", str(model_dir), "--methods", "ft,mend", "--batch-sizes", "1,2",
            "--limit", "3", "--data", str(data), "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "compare.json").read_text())
    assert results["batch_sizes"] == [1, 2]
    for k in ("1", "2"):
        keys = {"ES", "drawdown_acc", "drawdown_ppl_geo", "seconds_per_edit"}
        assert keys <= set(results["methods"]["ft"][k])
        assert "no trained MEND editor" in results["methods"]["mend"][k]["error"]  # reported, not hidden
    assert [results["methods"]["ft"][k]["n"] for k in ("1", "2")] == [3, 2]  # whole batches only
    table = (out / "compare.md").read_text()
    assert "| ft |" in table and "ES (k=2)" in table and "mend (k=1) not available" in table
    assert "k=2 on the first 2 of the 3 records" in table
    ns = results["methods"]["ft"]["1"]["NS_before"]  # the second table: PS, NS (and unedited), speed
    assert "| NS unedited | PS (k=1) | NS (k=1) | s/edit (k=1) |" in table and f"| ft | {ns:.1f} |" in table
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    sizes = args.index("--batch-sizes") + 1
    again = [*args[:sizes], "1,2,3", *args[sizes + 1 :], "--tabulate-only"]
    assert CliRunner().invoke(app, again).exit_code == 0  # runs nothing: k=3 is reported as not run
    results = json.loads((out / "compare.json").read_text())
    assert results["methods"]["ft"]["3"] == {"error": "not run"} and "ES" in results["methods"]["ft"]["2"]
    bad = CliRunner().invoke(app, [*args[:-2], "--out", str(out), "--editor", "ke=/nonexistent"])
    assert bad.exit_code == 2 and "METHOD=DIR" in bad.output


def test_retention_writes_the_curve_of_each_method(tmp_path):
    model_dir, data = tiny_setup(tmp_path, "llama", n=4)
    out = tmp_path / "retention"
    args = ["retention", "--model", str(model_dir), "--methods", "grace", "--limit", "4", "--points", "2",
            "--data", str(data), "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    row = json.loads((out / "retention.json").read_text())["methods"]["grace"]
    assert [p["edits"] for p in row["curve"]] == [2, 4]
    assert {"ES", "PS", "NS", "S", "unrelated_ppl_before", "unrelated_ppl_after"} <= set(row)
    assert "| grace |" in (out / "retention.md").read_text()
    assert (out / "retention.png").read_bytes()[:4] == b"\x89PNG"


def test_retention_merge_joins_runs_of_the_same_protocol(tmp_path):
    run = {"model": "m", "data": "d.json", "offset": 0, "limit": 4, "points": 2, "date": "day 1",
           "machine": "a",
           "methods": {"grace": {"S": 50.0, "curve": [{"edits": 2, "S": 60.0, "ES": 90.0}]}}}  # fmt: skip
    other = {**run, "date": "day 2", "methods": {"serac": {"S": 80.0, "curve": []}}}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "retention.json").write_text(json.dumps(run))
    (tmp_path / "b.json").write_text(json.dumps(other))
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["retention", "--out", str(out), "--merge", str(tmp_path / "a"),
                                      "--merge", str(tmp_path / "b.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    merged = json.loads((out / "retention.json").read_text())
    assert list(merged["methods"]) == ["grace", "serac"] and merged["date"] == "day 1, day 2"
    assert "| serac |" in (out / "retention.md").read_text() and (out / "retention.png").exists()
    # another protocol (here: another number of edits) or the same method twice is refused, clearly
    (tmp_path / "c.json").write_text(json.dumps({**other, "limit": 10}))
    for bad in ("c.json", "a"):
        result = CliRunner().invoke(app, ["retention", "--out", str(out), "--merge", str(tmp_path / "a"),
                                          "--merge", str(tmp_path / bad)])  # fmt: skip
        assert result.exit_code != 0 and ("limit" in result.output or "more than one" in result.output)
        assert "Traceback" not in result.output


def test_bench_resume_keeps_finished_runs(tmp_path):
    model_dir, data = tiny_setup(tmp_path)
    out = tmp_path / "bench"
    args = ["bench", "--model", str(model_dir), "--methods", "ft", "--data", str(data), "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    first = json.loads((out / "ft.json").read_text())
    assert first["summary"]["peak_rss_mb"] > 50  # each eval reports its own peak memory
    (out / "ft.log").unlink()
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert not (out / "ft.log").exists()  # not run again
    assert json.loads((out / "results.json").read_text())["methods"]["ft"]["ES"] == first["summary"]["ES"]


def test_bench_resume_continues_an_interrupted_eval(tmp_path, monkeypatch):
    """A method's eval killed after its first record: ``--resume`` keeps that record (marked here) and edits
    only the rest."""
    model_dir, data = tiny_setup(tmp_path)
    out = tmp_path / "bench"
    args = ["bench", "--model", str(model_dir), "--methods", "ft", "--data", str(data), "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    partial = out / "ft.json.partial.jsonl"
    assert not partial.exists()  # removed once the result is written
    (out / "ft.json").unlink()
    # the same eval that bench runs, in this process, stopped at its second edit
    quick = SUITES["quick"]
    command = _eval_command(
        str(model_dir), "ft", str(data), 0, quick["limit"], quick["fluency_tokens"], out / "ft.json"
    )
    original, calls = Editor.edit, []

    def edit_once(self, requests):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return original(self, requests)

    monkeypatch.setattr(Editor, "edit", edit_once)
    CliRunner().invoke(app, command[command.index("eval") :])
    monkeypatch.setattr(Editor, "edit", original)
    header, chunk = partial.read_text().splitlines()
    chunk = json.loads(chunk)
    chunk["results"][0]["post"]["ES"] = 12.5  # a mark that only a kept record can carry
    partial.write_text(f"{header}\n{json.dumps(chunk)}\n")
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    records = json.loads((out / "ft.json").read_text())["records"]
    assert records[0]["post"]["ES"] == 12.5 and records[1]["post"]["ES"] != 12.5
    assert not partial.exists()


def test_an_interrupted_sequential_eval_resumes_and_cleans_up(tmp_path, monkeypatch):
    """``eval --mode sequential --out`` keeps its stream beside OUT; ``--resume`` re-applies it, makes only
    the edits not saved yet, and removes the partial files once OUT is written."""
    monkeypatch.setattr(modeledit.evaluate, "SAVE_SECONDS", 0.0)
    model_dir, data = tiny_setup(tmp_path, n=3)
    out = tmp_path / "seq.json"
    args = ["eval", "--model", str(model_dir), "--method", "ft-l", "--data", str(data),
            "--mode", "sequential", "--retention-points", "3", "--out", str(out)]  # fmt: skip
    original, calls = Editor.edit, []

    def edit(self, requests):
        calls.append(requests[0].subject)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, requests)

    monkeypatch.setattr(Editor, "edit", edit)
    CliRunner().invoke(app, args)
    partial = tmp_path / "seq.json.partial.jsonl"
    assert not out.exists() and partial.exists() and stream_folder(partial).is_dir()
    calls.clear()
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert calls == [NAMES[2][0]]  # the first two edits came from the saved stream
    saved = json.loads(out.read_text())
    assert saved["summary"]["n"] == 3 and [p["edits"] for p in saved["retention"]] == [1, 2, 3]
    assert not partial.exists() and not stream_folder(partial).exists()


def test_retention_table_writes_a_collapsed_perplexity_in_scientific_notation_and_the_peak_memory():
    row = {"unrelated_ppl_before": 65.9, "unrelated_ppl_after": 4.7e28, "seconds_per_edit": 7.2,
           "peak_rss_mb": 4901.25}  # fmt: skip
    results = {"model": "m", "data": "d.json", "offset": 0, "limit": 2, "date": "today", "machine": "here",
               "methods": {"x": row}}  # fmt: skip
    table = retention_markdown(results)
    assert "| 65.9 | 4.7e+28 | 7.20 | 4901 |" in table and "peak RSS MB" in table
