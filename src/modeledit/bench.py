"""Benchmarks: every method's quality, speed and memory on the same records, as tables and plots.

Each method runs ``modeledit eval`` in its own process, so the peak RSS reported is that method's alone.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

SUITES: dict[str, dict] = {
    # quick: a smoke run of every method, under 10 minutes on 2 cores
    "quick": {"limit": 10, "fluency_tokens": 0},
    # full: the README's table
    "full": {"limit": 100, "fluency_tokens": 40},
}
COLUMNS = (
    "ES", "PS", "NS", "S", "ES_gen", "PS_gen", "NS_gen", "EM", "PM", "NM", "fluency", "seconds_per_edit",
    "edit_cost_ratio",
)  # fmt: skip
QUALITY = ("ES", "PS", "NS")


def _eval_command(
    model: str, method: str, data: str, offset: int, limit: int, fluency: int, out: Path
) -> list[str]:
    return [
        sys.executable, "-m", "modeledit.cli", "eval", "--model", model, "--method", method, "--data", data,
        "--offset", str(offset), "--limit", str(limit), "--fluency-tokens", str(fluency), "--out", str(out),
    ]  # fmt: skip


def run_method(command: list[str], log_path: Path, append: bool = False) -> tuple[int, float]:
    """Run one eval process; return its exit status and its own peak RSS in MB."""
    with open(log_path, "a" if append else "w") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "1000"},  # one-line error messages
        )
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024  # Linux reports kilobytes


def _same_run(out: Path, command: list[str]) -> dict | None:
    """The result already in ``out`` if it was made by this very eval command (model, data, records, mode)."""
    try:
        result = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    opts = {command[i]: command[i + 1] for i in range(4, len(command) - 1, 2)}  # eval --key value ...
    mode = opts.get("--mode", "single")
    expect = {
        "model": opts["--model"], "data": opts["--data"], "offset": int(opts["--offset"]),
        "limit": int(opts["--limit"]), "mode": mode,
        "batch_size": int(opts.get("--batch-size", 1)) if mode == "batch" else 1,
    }  # fmt: skip
    return result if "summary" in result and all(result.get(k) == v for k, v in expect.items()) else None


def run_eval(
    command: list[str], out: Path, resume: bool = False, tabulate_only: bool = False
) -> tuple[dict, float | None]:
    """Run one ``modeledit eval`` process writing ``out`` (its log beside it): (its JSON or {"error": last
    line of the log}, its peak RSS in MB). ``resume``: keep a finished result of the same command, continue
    an interrupted one; ``tabulate_only``: never run, report a missing result as not run (to assemble runs
    made in parallel)."""
    earlier = _same_run(out, command) if resume or tabulate_only else None
    if earlier is not None:
        return earlier, earlier["summary"].get("peak_rss_mb")
    if tabulate_only:
        return {"error": "not run"}, None
    log = out.with_suffix(".log")
    # an unfinished run continues (its log too)
    status, rss = run_method(command + (["--resume"] if resume else []), log, append=resume)
    if status != 0 or not out.exists():
        return {"error": _last_line(log)}, rss
    return json.loads(out.read_text()), rss


def _last_line(path: Path) -> str:
    lines = [
        ln.strip() for ln in path.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()
    ]
    return lines[-1] if lines else "no output"


def run_bench(
    model: str, methods: list[str], data: str, out_dir: Path, suite: str = "quick",
    offset: int = 0, limit: int | None = None, resume: bool = False,
) -> dict:  # fmt: skip
    """Evaluate the unedited model and each method on the same records; write results.json/.md and plots.

    ``resume``: a method whose finished run (same model, data, records) is already in ``out_dir`` is not run
    again, so an interrupted bench continues, and methods can be run by separate processes (compare and
    retention take the same flag).
    """
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}: use {' or '.join(SUITES)}")
    settings = SUITES[suite]
    limit = limit if limit is not None else settings["limit"]
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    for method in tqdm(["none", *methods], desc=f"bench {suite}"):
        out = out_dir / f"{method}.json"
        command = _eval_command(model, method, data, offset, limit, settings["fluency_tokens"], out)
        result, rss = run_eval(command, out, resume)
        rows[method] = result.get("summary", result) | {"peak_rss_mb": rss}
    results = {
        "suite": suite,
        "model": model,
        "data": data,
        "offset": offset,
        "limit": limit,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "command": "modeledit " + shlex.join(sys.argv[1:]) if sys.argv and "bench" in sys.argv else "",
        "methods": rows,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "results.md").write_text(markdown(results))
    plot(results, out_dir)
    return results


def _fmt(value, key: str) -> str:
    if value is None:
        return "-"
    if key == "seconds_per_edit":
        return f"{value:.2f}"
    if key.startswith("drawdown_ppl"):  # a ratio minus 1: batches of edits can reach 1e6 and more
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.1e}"
    if key == "peak_rss_mb":
        return f"{value:.0f}"
    if isinstance(value, float) and abs(value) >= 1e6:  # a perplexity after a collapse
        return f"{value:.1e}"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _source(results: dict) -> str:
    """Model, data and record range of a results dict, for the line above a table."""
    last = results["offset"] + results["limit"] - 1
    return f"Model `{results['model']}`, data `{results['data']}` records {results['offset']}-{last}"


def _table(head: list[str], rows: dict[str, dict], cells: Callable[[dict], list[str]]) -> list[str]:
    """A markdown table, one row per method; a method that failed shows its error."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in rows.items():
        if "error" in row:
            lines.append(f"| {method} | not available: {row['error']} |" + " |" * (len(head) - 2))
        else:
            lines.append(f"| {method} | " + " | ".join(cells(row)) + " |")
    return lines


def markdown(results: dict) -> str:
    rows = results["methods"]
    lines = [
        f"{_source(results)}, suite `{results['suite']}`, {results['date']}, {results['machine']}.",
        "",
        *_table(
            ["method", *COLUMNS, "peak RSS (MB)"],
            rows,
            lambda row: [_fmt(row.get(k), k) for k in (*COLUMNS, "peak_rss_mb")],
        ),
    ]
    timed = [r for r in rows.values() if "seconds_fwd_bwd" in r]
    if timed:
        fwd_bwd = sum(r["seconds_fwd_bwd"] for r in timed) / len(timed)
        fwd = sum(r["seconds_fwd"] for r in timed) / len(timed)
        lines += [
            "",
            f"Lower bounds on this machine: one forward+backward of the edit input {fwd_bwd:.3f} s "
            f"(gradient-based editors cannot do better), one forward pass {fwd:.3f} s "
            "(memory-based editors).",
        ]
    if results.get("command"):
        lines += ["", f"Command: `{results['command']}`"]
    return "\n".join(lines) + "\n"


def plot(results: dict, out_dir: Path) -> list[Path]:
    """quality.png: ES/PS/NS per method; speed.png: seconds per edit (log) with the lower bounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = {m: r for m, r in results["methods"].items() if "error" not in r}
    names = list(rows)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    for i, key in enumerate(QUALITY):
        ax.bar(x + (i - 1) * 0.27, [rows[m].get(key) or 0 for m in names], 0.27, label=key)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 105)
    ax.set_ylabel("score (x100)")
    ax.set_title(f"Edit quality, {results['model']}, {results['limit']} records")
    ax.legend(ncols=3, loc="lower right")
    fig.tight_layout()
    paths = [out_dir / "quality.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    timed = [m for m in names if rows[m].get("seconds_per_edit")]
    if timed:
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(timed)), 4))
        ax.bar(timed, [rows[m]["seconds_per_edit"] for m in timed], color="tab:gray")
        ax.set_yscale("log")
        fwd_bwd = np.mean([rows[m]["seconds_fwd_bwd"] for m in timed])
        fwd = np.mean([rows[m]["seconds_fwd"] for m in timed])
        ax.axhline(fwd_bwd, color="tab:red", linestyle="--", label=f"one forward+backward ({fwd_bwd:.3f} s)")
        ax.axhline(fwd, color="tab:blue", linestyle=":", label=f"one forward ({fwd:.3f} s)")
        ax.set_ylabel("seconds per edit (log)")
        ax.set_title("Edit speed")
        ax.legend()
        fig.tight_layout()
        paths.append(out_dir / "speed.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


# -- compare: the MEND paper's Tables 4 and 5 (edit success and drawdown, single edits and batches) ------

COMPARE_BATCHES = (1, 5, 25, 75)
COMPARE_LABELS = {"ES": "ES", "drawdown_acc": "acc DD", "drawdown_ppl_geo": "ppl DD"}
COMPARE_COLUMNS = tuple(COMPARE_LABELS)
# the second table: generalisation, locality and speed of the same runs
COMPARE_MORE_LABELS = {"PS": "PS", "NS": "NS", "seconds_per_edit": "s/edit"}
COMPARE_MORE = tuple(COMPARE_MORE_LABELS)


def eval_command_with_editor(
    model: str, method: str, data: str, offset: int, limit: int, editor: str | None, out: Path
) -> list[str]:
    """``modeledit eval`` of one method with its trained editor; an ENN editor brings its own base model."""
    if editor and method == "enn" and (Path(editor) / "model").is_dir():
        model = str(Path(editor) / "model")  # ENN's edits are patches against its meta-trained base
    command = _eval_command(model, method, data, offset, limit, 0, out)
    return command + (["--editor", editor] if editor else [])


def whole_batches(limit: int, k: int) -> int:
    """The records a batch size uses: whole batches of k only (500 records: 450 at k = 75); all of them when
    there are fewer than k."""
    return limit - limit % k if k <= limit else limit


def run_compare(
    model: str, methods: list[str], data: str, out_dir: Path, editors: dict[str, str] | None = None,
    batch_sizes: tuple[int, ...] = COMPARE_BATCHES, offset: int = 0, limit: int = 75, resume: bool = False,
    tabulate_only: bool = False,
) -> dict:  # fmt: skip
    """ES and drawdown of each method for single edits and batches; writes compare.json/.md/.png."""
    editors = editors or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    runs = [(m, k) for m in methods for k in batch_sizes]
    for method, k in tqdm(runs, desc="compare"):
        out = out_dir / f"{method}_k{k}.json"
        records = whole_batches(limit, k)
        command = eval_command_with_editor(model, method, data, offset, records, editors.get(method), out)
        if k > 1:
            command += ["--mode", "batch", "--batch-size", str(k)]
        result, rss = run_eval(command, out, resume, tabulate_only)
        keep = (*COMPARE_COLUMNS, *COMPARE_MORE, "drawdown_ppl", "NS_before", "n")
        summary = result.get("summary")
        if summary and "drawdown_ppl_geo" not in summary:  # results of an eval before it reported it
            from .evaluate import geometric_drawdown  # (imports torch: only when needed)

            summary["drawdown_ppl_geo"] = geometric_drawdown(result["records"])
        rows.setdefault(method, {})[str(k)] = (
            {key: summary.get(key) for key in keep} | {"peak_rss_mb": rss} if summary else result
        )
    results = {
        "model": model,
        "data": data,
        "offset": offset,
        "limit": limit,
        "batch_sizes": list(batch_sizes),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "methods": rows,
    }
    (out_dir / "compare.json").write_text(json.dumps(results, indent=1))
    (out_dir / "compare.md").write_text(compare_markdown(results))
    plot_compare(results, out_dir / "compare.png")
    return results


def compare_markdown(results: dict) -> str:
    sizes = [str(k) for k in results["batch_sizes"]]

    def cells(columns: tuple[str, ...]) -> Callable[[dict], list[str]]:
        def row_cells(row: dict) -> list[str]:
            out = []
            for k in sizes:
                cell = row.get(k, {})
                out += ["n/a" if "error" in cell else _fmt(cell.get(c), c) for c in columns]
            return out

        return row_cells

    def unedited_ns(row: dict) -> list[str]:  # the model each method edits (ENN: its own base)
        known = [cell["NS_before"] for cell in row.values() if cell.get("NS_before") is not None]
        return [_fmt(known[0] if known else None, "NS")]

    def head(labels: dict[str, str]) -> list[str]:
        return [f"{labels[c]} (k={k})" for k in sizes for c in labels]

    lines = [
        f"{_source(results)}, {results['date']}, {results['machine']}. k = edits applied together (k=1: "
        "single edits). ES: edit success (x100); acc DD: drop of neighbourhood accuracy (points); ppl DD: "
        "relative increase of neighbourhood perplexity (geometric mean over records).",
        "",
        *_table(["method", *head(COMPARE_LABELS)], results["methods"], cells(COMPARE_COLUMNS)),
        "",
        "The same runs: PS: paraphrase success; NS: neighbourhood success (unedited: before the edits, on "
        "the model the method edits); s/edit: seconds per edit (a batch's time / k).",
        "",
        *_table(
            ["method", "NS unedited", *head(COMPARE_MORE_LABELS)],
            results["methods"],
            lambda row: unedited_ns(row) + cells(COMPARE_MORE)(row),
        ),
    ]
    limit = results["limit"]
    fewer = [k for k in results["batch_sizes"] if whole_batches(limit, k) < limit]
    if fewer:
        parts = ", ".join(f"k={k} on the first {whole_batches(limit, k)}" for k in fewer)
        lines += ["", f"Whole batches only: {parts} of the {limit} records."]
    errors = [(m, k, r[k]["error"]) for m, r in results["methods"].items() for k in r if "error" in r[k]]
    if errors:
        lines += ["", *(f"- {m} (k={k}) not available: {e}" for m, k, e in errors)]
    return "\n".join(lines) + "\n"


def plot_compare(results: dict, path: Path) -> None:
    """ES and accuracy drawdown against the number of edits applied together, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, row in results["methods"].items():
        sizes = [k for k in results["batch_sizes"] if "error" not in row.get(str(k), {"error": 1})]
        if not sizes:
            continue
        for ax, key in ((axes[0], "ES"), (axes[1], "drawdown_acc")):
            values = [row[str(k)].get(key) or 0.0 for k in sizes]
            ax.plot(sizes, values, marker="o", label=method)
    for ax, title in zip(axes, ("Edit success (ES)", "Neighbourhood accuracy drawdown (points)")):
        ax.set_xscale("log")
        ax.set_xticks(results["batch_sizes"], [str(k) for k in results["batch_sizes"]])
        ax.set_xlabel("edits applied together (k)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['model']}, {results['limit']} records")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- retention: sequential editing, all edits so far scored as the stream grows -------------------------


def run_retention(
    model: str, methods: list[str], data: str, out_dir: Path, editors: dict[str, str] | None = None,
    points: int = 10, offset: int = 0, limit: int = 100, resume: bool = False,
) -> dict:  # fmt: skip
    """``limit`` sequential edits per method, S on all edits so far at ``points`` points of the stream;
    writes retention.json, retention.md and retention.png (one line per method)."""
    editors = editors or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    keep = ("ES", "PS", "NS", "S", "NS_before", "unrelated_ppl_before", "unrelated_ppl_after",
            "seconds_per_edit", "edit_cost_ratio")  # fmt: skip
    for method in tqdm(methods, desc="retention"):
        out = out_dir / f"{method}.json"
        command = eval_command_with_editor(model, method, data, offset, limit, editors.get(method), out)
        command += ["--mode", "sequential", "--retention-points", str(points)]
        result, rss = run_eval(command, out, resume)
        summary = result.get("summary")
        rows[method] = (
            {k: summary.get(k) for k in keep} | {"curve": result["retention"], "peak_rss_mb": rss}
            if summary
            else result
        )
    results = {
        "model": model, "data": data, "offset": offset, "limit": limit, "points": points,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "methods": rows,
    }  # fmt: skip
    _write_retention(results, out_dir)
    return results


def merge_retention(sources: list[Path], out_dir: Path) -> dict:
    """One retention table and plot from the retention.json of several runs of the same protocol (model,
    data, records): long streams are run one method at a time, often in different sessions."""
    files = [s / "retention.json" if s.is_dir() else s for s in sources]
    parts = []
    for f in files:
        if not f.is_file():
            raise ValueError(f"cannot read {f}: no such file (give retention.json files or their folders)")
        parts.append(json.loads(f.read_text()))
    first = parts[0]
    merged: dict[str, dict] = {}
    for f, part in zip(files, parts):
        for key in ("model", "data", "offset", "limit"):
            if part.get(key) != first.get(key):
                raise ValueError(
                    f"{f} was run with {key} = {part.get(key)!r}, {files[0]} with {first.get(key)!r}: "
                    "only runs of the same protocol can share a table"
                )
        for method, row in part["methods"].items():
            if method in merged:
                raise ValueError(f"{method} is in more than one of the files; keep one of its runs")
            merged[method] = row
    results = {**first, "methods": merged}
    for key in ("date", "machine", "points"):  # runs of different days or machines: list them all
        results[key] = ", ".join(dict.fromkeys(str(p[key]) for p in parts))
    _write_retention(results, out_dir)
    return results


def _write_retention(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "retention.json").write_text(json.dumps(results, indent=1))
    (out_dir / "retention.md").write_text(retention_markdown(results))
    plot_retention(results, out_dir / "retention.png")


RETENTION_COLUMNS = {
    "ES": "ES", "PS": "PS", "NS": "NS", "NS_before": "NS unedited", "S": "S",
    "unrelated_ppl_before": "unrelated ppl before", "unrelated_ppl_after": "after",
    "seconds_per_edit": "seconds_per_edit", "peak_rss_mb": "peak RSS MB",
}  # fmt: skip


def retention_markdown(results: dict) -> str:
    lines = [
        f"{_source(results)}: {results['limit']} sequential edits, all scored after the last one; "
        f"unrelated-text perplexity before the first and after the last edit; {results['date']}, "
        f"{results['machine']}.",
        "",
        *_table(
            ["method", *RETENTION_COLUMNS.values()],
            results["methods"],
            lambda row: [_fmt(row.get(k), k) for k in RETENTION_COLUMNS],
        ),
    ]
    return "\n".join(lines) + "\n"


def plot_retention(results: dict, path: Path) -> None:
    """S and ES on all edits made so far against the number of edits, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, row in results["methods"].items():
        curve = row.get("curve") or []
        if curve:
            edits = [p["edits"] for p in curve]
            for ax, key in zip(axes, ("S", "ES")):
                ax.plot(edits, [p.get(key) or 0.0 for p in curve], marker="o", ms=3, label=method)
    for ax, label in zip(axes, ("S (harmonic mean of ES, PS, NS)", "ES")):
        ax.set_xlabel("sequential edits so far")
        ax.set_ylabel(label)
        ax.set_ylim(0, 105)
        ax.legend(fontsize=8)
    fig.suptitle(f"Retention of all edits so far, {results['model']}, {results['limit']} edits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
