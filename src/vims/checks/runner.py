"""Run a round of checks and build the report.

Consistency: a running guest can be read mid-update (a torn list). ``pause``
stops the guest for the round (QMP stop/cont in the lab, LibVMI pause on Xen);
``retry`` re-runs the round until two consecutive rounds agree (when they never
do, only the findings every attempt saw are kept: a busy guest's forks are not
hidden tasks); ``none`` reads once. ``auto`` (the default) pauses when the
backend can and retries otherwise.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from typing import Any

from vims import __version__
from vims.checks import ALL_CHECKS, DEFAULT_CHECKS
from vims.checks.base import CheckResult, Context, Status
from vims.vmi.memory import GuestMemory

REPORT_FORMAT = "vims-report/1"
MAX_RETRIES = 5


def select_checks(ids: list[str] | None) -> list[str]:
    from vims.errors import VimsError

    if not ids:
        return list(DEFAULT_CHECKS)
    unknown = [i for i in ids if i not in ALL_CHECKS]
    if unknown:
        raise VimsError(f"unknown check id {', '.join(unknown)} (known: {', '.join(ALL_CHECKS)})")
    return ids


def _round(ctx: Context, ids: list[str]) -> list[CheckResult]:
    ctx.reset()
    results = []
    for cid in ids:
        results.append(ALL_CHECKS[cid]().execute(ctx))
    return results


def _only(result: CheckResult, keys: set[tuple[str, str]]) -> CheckResult:
    """*result* with only the findings whose key is in *keys* (status follows)."""
    kept = [f for f in result.findings if f.key() in keys]
    status = result.status
    if status is Status.FAIL and not kept:
        status = Status.PASS
    return dataclasses.replace(result, findings=kept, status=status)


def _signature(results: list[CheckResult]) -> list[tuple[str, str, tuple[tuple[str, str], ...]]]:
    return [(r.id, str(r.status), tuple(sorted(f.key() for f in r.findings))) for r in results]


def run_round(mem: GuestMemory, ids: list[str], baseline: dict[str, Any] | None,
              policy: dict[str, Any] | None, consistency: str = "auto",
              target: dict[str, Any] | None = None,
              history: dict[str, Any] | None = None,
              params: dict[str, dict[str, Any]] | None = None,
              tracing: Any = None) -> dict[str, Any]:
    """One check round (every check when ``ids`` is empty); returns the report.

    ``history`` is the caller's memory of earlier rounds of this C-VM (updated in
    place); checks of change over time need it.
    """
    ids = select_checks(ids)
    ctx = Context(mem, baseline, policy, history, params, tracing)
    mode = consistency
    if mode == "auto":
        mode = "pause" if mem.can_pause else "retry"
    start = time.perf_counter()
    attempts = 1
    mem.flush()  # the guest ran since the last round: cached translations may be stale
    paused_ms = 0.0
    if mode == "pause":
        # The guest is held only for the walks of changing structures; checks of
        # memory that does not move run right after, with the guest running.
        held = [i for i in ids if ALL_CHECKS[i].needs_pause]
        with mem.paused():
            stopped = time.perf_counter()
            results = _round(ctx, held)
            view = _semantic_view(ctx)
            paused_ms = (time.perf_counter() - stopped) * 1000
        results += [ALL_CHECKS[cid]().execute(ctx) for cid in ids if cid not in held]
        order = {cid: n for n, cid in enumerate(ids)}
        results.sort(key=lambda r: order[r.id])
    elif mode == "retry":
        results = _round(ctx, ids)
        view = _semantic_view(ctx)
        every = {r.id: {f.key() for f in r.findings} for r in results}
        agreed = False
        while attempts < MAX_RETRIES:
            mem.flush()
            again = _round(ctx, ids)
            attempts += 1
            for r in again:
                every[r.id] = every.get(r.id, set()) & {f.key() for f in r.findings}
            if _signature(again) == _signature(results):
                agreed = True
                break
            results, view = again, _semantic_view(ctx)
        if not agreed:
            # The guest kept changing under the reads: keep only what every attempt saw.
            # A hidden task or a hook persists; a task caught mid-fork does not.
            results = [_only(r, every.get(r.id, set())) for r in results]
    else:
        results = _round(ctx, ids)
        view = _semantic_view(ctx)
    elapsed = (time.perf_counter() - start) * 1000
    if history is not None:
        history.update(ctx.updates)
    findings = [f.public() for r in results for f in r.findings]
    statuses = {r.status for r in results}
    # Findings win over errors: a detected attack must not read as a mere error.
    verdict = ("fail" if Status.FAIL in statuses else
               "error" if Status.ERROR in statuses else "pass")
    return {
        "format": REPORT_FORMAT,
        "producer": f"vims {__version__}",
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        "target": {**(target or {}), "kaslr_offset": f"0x{mem.kaslr_offset:x}"},
        "profile": {"release": mem.profile.release, "build_id": mem.profile.build_id},
        "consistency": {"mode": mode, "rounds": attempts, "paused_ms": round(paused_ms, 3)},
        "duration_ms": round(elapsed, 3),
        "result": verdict,
        "checks": [{"id": r.id, "status": str(r.status), "duration_ms": r.duration_ms,
                    "findings": len(r.findings), "error": r.error,
                    "severity": str(ALL_CHECKS[r.id].severity),
                    "category": str(ALL_CHECKS[r.id].category)} for r in results],
        "findings": findings,
        **view,
    }


def _semantic_view(ctx: Context) -> dict[str, Any]:
    try:
        # pid 0 is the idle task, not a process: ps and volatility leave it out too.
        return {"processes": [t.public() for t in ctx.tasks if t.pid == t.tgid and t.pid],
                "modules": [m.public() for m in ctx.modules]}
    except Exception as exc:  # noqa: BLE001 - a torn or tampered list: report, don't crash
        return {"processes": [], "modules": [], "view_error": str(exc)}


def exit_status(report: dict[str, Any]) -> int:
    """CLI contract: 0 pass, 1 findings, 2 error."""
    return {"pass": 0, "fail": 1}.get(report["result"], 2)
