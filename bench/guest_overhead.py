"""Benchmark: what VIMS costs the C-VM, measured the paper's way (httperf on its web server).

Boots a lab C-VM, then drives its httpd through the host-forwarded port with
httperf (Debian's) while the A-VM side runs every check at a given frequency,
one request after another, and reports requests/s and reply time for each setting,
side by side:

- ``off``: no introspection at all (the reference);
- ``1hz-pause`` / ``10hz-pause``: all checks every 1 s / 0.1 s, the guest paused
  for each round (``--consistency pause``, what ``auto`` does in the lab);
- ``1hz-retry`` / ``10hz-retry``: the same without pausing (rounds re-read until
  two agree).

Settings are interleaved over ``--repeats`` passes so a change in the shared
machine's load hits them alike. The guest runs under QEMU TCG on a 2-core
machine where the checks and the emulator compete for the same cores, so these
are figures for this lab, not for hardware virtualisation.

System-call tracing (``vims behaviour``, through QEMU's gdbstub) is measured on
its own, with ``--trace-conns`` requests per run (it is orders of magnitude
slower): tracing httpd itself, and tracing an application that serves nothing
(crond), each with and without gating on address-space switches — what
selection bounds and what it does not — and tracing httpd 10 % of the time
(the policy's ``duty``), which bounds the cost in time instead.

Run: ``.venv/bin/python bench/guest_overhead.py [--seconds 15] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

from vims.baseline import load as load_baseline
from vims.checks import DEFAULT_CHECKS
from vims.checks.runner import run_round
from vims.lab import LabManager, LabSpec
from vims.trace.model import AppModel, Model
from vims.trace.session import TraceSession
from vims.trace.tracer import SyscallEvent, SyscallTracer
from vims.vmi.memory import GuestMemory
from vims.vmi.profile import Profile

SETTINGS: dict[str, tuple[float | None, str]] = {
    "off": (None, "none"),
    "1hz-pause": (1.0, "pause"),
    "1hz-retry": (1.0, "retry"),
    "10hz-pause": (0.1, "pause"),
    "10hz-retry": (0.1, "retry"),
    # What a policy would do: the cheap list checks every second, the checks that read
    # every page of kernel or process text (and every memory map) every 10 s.
    "1hz-tiered": (1.0, "pause"),
}
SLOW_CHECKS = ("kernel.text", "process.code", "kernel.hidden_modules", "behaviour.memory")
TIERED_EVERY = 10
# Tracing settings: the traced application's comm and whether to gate on switches.
TRACING: dict[str, tuple[str, bool]] = {
    "trace-httpd": ("httpd", False),
    "trace-httpd-gated": ("httpd", True),
    "trace-crond": ("crond", False),
    "trace-crond-gated": ("crond", True),
}


def httperf(port: int, conns: int, timeout: float = 5) -> dict[str, float]:
    """*conns* requests, one connection after another (closed loop): rate and reply time."""
    out = subprocess.run(
        ["httperf", "--hog", "--server", "127.0.0.1", "--port", str(port), "--uri", "/",
         "--num-conns", str(conns), "--timeout", str(timeout)],
        capture_output=True, text=True, check=True, timeout=conns * timeout + 30).stdout
    req = re.search(r"Request rate: ([\d.]+) req/s", out)
    reply = re.search(r"Reply time \[ms\]: response ([\d.]+) transfer ([\d.]+)", out)
    errors = re.search(r"Errors: total (\d+)", out)
    if not (req and reply and errors):
        raise RuntimeError(f"unexpected httperf output:\n{out}")
    return {"req_per_s": float(req[1]), "reply_ms": float(reply[1]) + float(reply[2]),
            "errors": int(errors[1])}


def checker(mem: GuestMemory, baseline: dict[str, Any], policy: dict[str, Any],
            interval: float, consistency: str, stop: threading.Event,
            rounds: list[float], failures: list[str], paused: list[float],
            tiered: bool = False) -> None:
    """The A-VM's side: all checks every *interval* seconds until *stop* (``tiered``:
    the slow ones only every TIERED_EVERY rounds, spread from the first)."""
    n = 0
    while not stop.is_set():
        start = time.perf_counter()
        ids = [c for c in DEFAULT_CHECKS
               if not tiered or c not in SLOW_CHECKS or n % TIERED_EVERY == 5]
        n += 1
        report = run_round(mem, ids, baseline, policy, consistency, {"memory": "bench"})
        rounds.append(time.perf_counter() - start)
        paused.append(report["consistency"].get("paused_ms", 0.0))
        if report["result"] != "pass":  # a clean guest: worth reporting, not hiding
            failures.append("; ".join([f["summary"] for f in report["findings"][:2]] + [
                f"{c['id']}: {c['error']}" for c in report["checks"] if c["error"]][:2]))
        stop.wait(max(0.0, interval - (time.perf_counter() - start)))


def tracing(profile: Path, ram: Path, gdb: Path, port: int, conns: int,
            off: float) -> dict[str, dict[str, float]]:
    """httperf while the tracer follows one application (the guest otherwise untouched)."""
    table = {}
    for name, (comm, gate) in TRACING.items():
        events: list[SyscallEvent] = []
        with GuestMemory(Profile.load(profile), path=ram) as mem, \
                SyscallTracer(mem, gdb, {comm: [comm]}, events.append, gate=gate) as tracer:
            figures = httperf(port, conns, timeout=60)
        stats = tracer.stats
        table[name] = {
            "req_per_s": round(figures["req_per_s"], 2),
            "throughput_cost_pct": round(100 * (1 - figures["req_per_s"] / off), 1),
            "reply_ms": round(figures["reply_ms"], 1), "errors": int(figures["errors"]),
            "stops_per_request": round(stats.stops / conns, 1),
            "traced_calls_per_request": round(len(events) / conns, 1),
            "switch_stops": stats.switch_stops, "syscall_stops": stats.syscall_stops,
        }
    # Bounded in time: attached 1 s in every 10 (policy params duty/period_s), ~20 s of load.
    model = Model(apps={"httpd": AppModel(comm=["httpd"])})
    session = TraceSession(Profile.load(profile), ram, gdb, model, duty=0.1, period_s=10.0)
    try:
        figures = httperf(port, max(20, int(off * 20)), timeout=60)
    finally:
        session.close()
    table["trace-httpd-duty10"] = {
        "req_per_s": round(figures["req_per_s"], 2),
        "throughput_cost_pct": round(100 * (1 - figures["req_per_s"] / off), 1),
        "reply_ms": round(figures["reply_ms"], 1), "errors": int(figures["errors"]),
        "syscall_stops": session.stats.syscall_stops,
    }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=15.0, help="httperf run per setting")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trace-conns", type=int, default=20,
                        help="requests per tracing run (0: skip tracing)")
    args = parser.parse_args()
    if shutil.which("httperf") is None:
        sys.exit("httperf is not installed (apt-get install httperf; scripts/setup.sh does)")
    work = Path(tempfile.mkdtemp(prefix="vims-bench-"))
    mgr = LabManager()
    lab = mgr.up(LabSpec(name=f"bench-overhead-{os.getpid()}"))
    try:
        profile_path, base_path = work / "profile.json", work / "baseline.json"
        venv = Path(sys.executable).parent
        subprocess.run([venv / "vims", "profile", "build", "--kernel", lab.kernel, "--out",
                        profile_path], check=True, capture_output=True)
        subprocess.run([venv / "vims", "baseline", "build", "--profile", profile_path,
                        "--initramfs", lab.initrd, "--memory", lab.ram_path, "--out",
                        base_path], check=True, capture_output=True)
        policy = json.loads((resources.files("vims.lab") / "policy.json").read_text())
        baseline = load_baseline(base_path)
        port = lab.http_port
        assert port is not None
        # Requests one after another, as many as the untouched guest serves in --seconds.
        conns = max(20, int(httperf(port, 50)["req_per_s"] * args.seconds))
        results: dict[str, list[dict[str, float]]] = {k: [] for k in SETTINGS}
        with GuestMemory(Profile.load(profile_path), path=Path(lab.ram_path),
                         pauser=lambda: mgr.paused(lab.name)) as mem:
            run_round(mem, list(DEFAULT_CHECKS), baseline, policy, "pause", {"memory": "bench"})
            for _ in range(args.repeats):
                for name, (interval, consistency) in SETTINGS.items():
                    stop = threading.Event()
                    rounds: list[float] = []
                    failures: list[str] = []
                    paused: list[float] = []
                    worker = None
                    if interval is not None:
                        worker = threading.Thread(target=checker, args=(
                            mem, baseline, policy, interval, consistency, stop, rounds,
                            failures, paused, name == "1hz-tiered"))
                        worker.start()
                    began = time.perf_counter()
                    figures = httperf(port, conns)
                    elapsed = time.perf_counter() - began
                    stop.set()
                    if worker is not None:
                        worker.join()
                    figures["rounds"] = len(rounds)
                    figures["failed_rounds"] = len(failures)
                    if failures:
                        print(f"{name}: {failures[0]}", file=sys.stderr)
                    figures["round_ms"] = statistics.median(rounds) * 1000 if rounds else 0.0
                    figures["paused_ms_per_s"] = sum(paused) / elapsed
                    results[name].append(figures)
        off = statistics.median(r["req_per_s"] for r in results["off"])
        table = {}
        for name, runs in results.items():
            req = statistics.median(r["req_per_s"] for r in runs)
            table[name] = {
                "req_per_s": round(req, 1),
                "throughput_cost_pct": round(100 * (1 - req / off), 1),
                "reply_ms": round(statistics.median(r["reply_ms"] for r in runs), 1),
                "errors": sum(int(r["errors"]) for r in runs),
                "rounds_per_run": statistics.median(r["rounds"] for r in runs),
                "failed_rounds": sum(int(r["failed_rounds"]) for r in runs),
                "round_ms": round(statistics.median(r["round_ms"] for r in runs), 1),
                "paused_ms_per_s": round(statistics.median(r["paused_ms_per_s"] for r in runs),
                                         1),
            }
        if args.trace_conns:
            table.update(tracing(profile_path, Path(lab.ram_path), Path(lab.gdb_socket),
                                 port, args.trace_conns, off))
        print(json.dumps({"requests_per_run": conns, "seconds": args.seconds,
                          "repeats": args.repeats, "trace_requests_per_run": args.trace_conns,
                          "results": table}, indent=2))
    finally:
        mgr.down(lab.name)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
