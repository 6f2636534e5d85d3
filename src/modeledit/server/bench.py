"""Measurements of the service (docs/service.md): generation latency with 0, 10 and 100 edits applied, and
requests per second of /v1/generate with concurrent clients on loopback, without and while edits are made.

    OMP_NUM_THREADS=1 python -m modeledit.server.bench --data ../shared/data/counterfact/dev.json \
        --out runs/service-bench.json

Edits are real ``ft-l`` edits of CounterFact records made through a ledger (P(target) recorded, no greedy
answers, to save time). Everything stays on 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from ..ledger import Ledger
from ..lm import generate
from ..models import load_model
from ..patch import revert_all
from ..requests import EditRequest, load_requests
from . import ServerThread, create_app

PROMPTS = [
    "The mother tongue of Danielle Darrieux is",
    "The capital of France is",
    "Michel Rocard is a native speaker of",
]


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def latency(model, tokenizer, new_tokens: int, repeats: int) -> dict:
    """Seconds for one greedy generation of ``new_tokens`` tokens (batch 1), over PROMPTS x repeats."""
    generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2)  # warm-up
    times = []
    for _ in range(repeats):
        for prompt in PROMPTS:
            start = time.perf_counter()
            generate(model, tokenizer, [prompt], max_new_tokens=new_tokens)
            times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "p90_s": _percentile(times, 0.9),
        "n": len(times),
        "times": times,
    }


def load_test(url: str, clients: int, seconds: float, new_tokens: int, edits: list[dict] | None, token: str):
    """``clients`` threads POST /v1/generate for ``seconds``; optionally one more edits and reverts."""
    stop = threading.Event()
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []
    edit_log: list[dict] = []

    def client(i: int) -> None:
        with httpx.Client(timeout=120) as c:
            for n in range(100_000):  # bounded; stops on the clock
                if stop.is_set():
                    return
                prompt = PROMPTS[(i + n) % len(PROMPTS)]
                start = time.perf_counter()
                r = c.post(url + "/v1/generate", json={"prompt": prompt, "max_new_tokens": new_tokens})
                with lock:
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - start)
                    else:
                        failures.append(r.text)

    def editor() -> None:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(timeout=600) as c:
            for body in edits or []:
                if stop.is_set():
                    return
                start = time.perf_counter()
                r = c.post(url + "/v1/edits", json=body, headers=headers)
                applied = time.perf_counter()
                if r.status_code != 201:
                    failures.append(r.text)
                    return
                c.delete(f"{url}/v1/edits/{r.json()['id']}", headers=headers)
                edit_log.append({"edit_s": applied - start, "revert_s": time.perf_counter() - applied})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    edit_thread = threading.Thread(target=editor)
    start = time.perf_counter()
    for t in threads:
        t.start()
    if edits:
        edit_thread.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=600)
    elapsed = time.perf_counter() - start  # the clients' window (an edit in progress may finish later)
    if edits:
        edit_thread.join(timeout=600)
    return {
        "clients": clients,
        "seconds": elapsed,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / elapsed,
        "latency_median_s": statistics.median(latencies) if latencies else None,
        "latency_p95_s": _percentile(latencies, 0.95) if latencies else None,
        "failures": len(failures),
        "edits_applied_and_reverted": len(edit_log),
        "edit_s_median": statistics.median([e["edit_s"] for e in edit_log]) if edit_log else None,
        "latencies_s": latencies,
    }


def _set_applied(model, patches: list, count: int) -> None:
    """The model with exactly the first ``count`` patches applied (base + patches, as the ledger derives)."""
    revert_all(model)
    for p in patches[:count]:
        p.apply(model)


def _merge(windows: list[dict]) -> dict:
    latencies = [t for w in windows for t in w["latencies_s"]]
    requests = sum(w["requests"] for w in windows)
    seconds = sum(w["seconds"] for w in windows)
    return {
        "clients": windows[0]["clients"],
        "windows": len(windows),
        "seconds": seconds,
        "requests": requests,
        "requests_per_s": requests / seconds,
        "latency_median_s": statistics.median(latencies) if latencies else None,
        "latency_p95_s": _percentile(latencies, 0.95) if latencies else None,
        "failures": sum(w["failures"] for w in windows),
        "edits_applied_and_reverted": sum(w["edits_applied_and_reverted"] for w in windows),
        "edit_s_median": statistics.median(
            [w["edit_s_median"] for w in windows if w["edit_s_median"]] or [0]
        ),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default="../shared/data/counterfact/dev.json")
    parser.add_argument("--method", default="ft-l")
    parser.add_argument("--counts", default="0,10,100", help="numbers of applied edits to time generation at")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="rounds over the counts (interleaved)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30, help="length of one load-test window")
    parser.add_argument("--windows", type=int, default=2, help="idle/editing window pairs (alternated)")
    parser.add_argument("--out", default="runs/service-bench.json")
    args = parser.parse_args(argv)

    counts = sorted(int(c) for c in args.counts.split(","))
    requests = load_requests(args.data, limit=max(counts) + 40)
    model, tokenizer = load_model(args.model)
    result: dict = {
        "model": args.model,
        "method": args.method,
        "torch_threads": torch.get_num_threads(),
        "new_tokens": args.new_tokens,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(Path(tmp) / "edits.db")
        edit_seconds = []
        for r in requests[: max(counts)]:
            start = time.perf_counter()
            request = EditRequest(
                prompt=r.prompt, subject=r.subject, target_new=r.target_new, target_true=r.target_true
            )
            ledger.edit(model, tokenizer, request, args.method, answer_tokens=0)
            edit_seconds.append(time.perf_counter() - start)
            print(f"edit {len(edit_seconds)}: {edit_seconds[-1]:.1f} s", flush=True)
        result["ledger_edit_s_median"] = statistics.median(edit_seconds) if edit_seconds else None
        patches = [ledger.patch(e.id) for e in ledger.entries("applied")]

        # generation latency, the edit counts interleaved so that a change of machine load hits them alike
        times: dict[int, list[float]] = {c: [] for c in counts}
        for _ in range(args.repeats):
            for count in counts:
                _set_applied(model, patches, count)
                times[count] += latency(model, tokenizer, args.new_tokens, 1)["times"]
        result["latency"] = {
            str(c): {"median_s": statistics.median(t), "p90_s": _percentile(t, 0.9), "n": len(t)}
            for c, t in times.items()
        }
        print("latency:", result["latency"], flush=True)

        # the service, with the ledger's edits replayed on start
        token = "bench-token"
        start = time.perf_counter()
        app = create_app(model, tokenizer, ledger, token=token)  # reverts all, copies, replays the ledger
        result["service_start_with_replay_s"] = time.perf_counter() - start
        more = [
            {"method": args.method, "prompt": r.prompt, "subject": r.subject, "target_new": r.target_new}
            for r in requests[max(counts) :]
        ]
        idle, editing = [], []
        with ServerThread(app) as server:
            for w in range(args.windows):
                idle.append(load_test(server.url, args.clients, args.seconds, args.new_tokens, None, token))
                print("without edits:", {k: v for k, v in idle[-1].items() if k != "latencies_s"}, flush=True)
                chunk = more[w * 20 : (w + 1) * 20]
                editing.append(
                    load_test(server.url, args.clients, args.seconds, args.new_tokens, chunk, token)
                )
                print(
                    "while editing:", {k: v for k, v in editing[-1].items() if k != "latencies_s"}, flush=True
                )
        result["rps_idle"], result["rps_while_editing"] = _merge(idle), _merge(editing)
        result["load_average_at_end"] = os.getloadavg()
        ledger.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
