"""Benchmark: the gate's decisions while hostile clients work on the REM-S.

Run::

    .venv/bin/python bench/rems_hostile.py [--src OTHER_CHECKOUT/src]

A real ``vims rems serve`` (SQLite, TLS API, loopback gate listener, 1,024 open
files) answers ``GET /v1/decision/{cvm}`` on its gate listener, one request after
another from a separate process, first undisturbed, then while each attack of
issue 20 runs from this process:

1. unauthenticated request bodies of 100 MB (chunked, to the TLS API), in a loop;
2. 1,100 TLS connections that each send half a request, and 300 that never finish
   their TLS handshake;
4. authenticated policy writes with values that used to break the REM-S;
5. requests that used to answer 500 (NaN timeouts, lone surrogates);
6. on-demand attestation of C-VMs no A-VM serves, in a loop;
7. 10,000 bare TCP connects to the TLS control channel.

(3, a poisoned report from an enrolled A-VM, needs the A-VM side and is covered by
tests/unit/test_rems_channel_policy.py.) It prints one JSON object: per phase the
decision latency p50/p99/max, how many decisions failed, and the REM-S's RSS.
``--src`` runs the REM-S from another checkout's ``src`` (e.g. a git worktree of
an older commit) for a side-by-side comparison. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import secrets
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from vims.lab.deploy import write_rems_config, write_rems_pki

NOFILE = 1024


def probe(port: int, seconds: float) -> None:
    """(child process) Decisions one after another for *seconds*; prints latencies."""
    lat: list[float] = []
    failed = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/decision/cvm1", timeout=5)
        except urllib.error.HTTPError as exc:
            failed += exc.code != 403
        except OSError:
            failed += 1
        lat.append((time.perf_counter() - t) * 1000)
        time.sleep(0.01)
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else lat * 99
    print(json.dumps({"p50_ms": round(statistics.median(lat), 2), "p99_ms": round(q[98], 2),
                      "max_ms": round(max(lat), 2), "decisions": len(lat), "failed": failed}))


class Rems:
    def __init__(self, root: Path, src: Path | None) -> None:
        write_rems_pki(root / "pki")
        self.token = secrets.token_hex(24)
        (root / "admin.token").write_text(self.token)
        self.channel, self.http, self.gate = write_rems_config(
            root / "rems.toml", state=root, pki=root / "pki", token_file=root / "admin.token",
            ek_ca_certs=[], pcr17_hex="00" * 32)
        self.ca = root / "pki" / "ca.pem"
        env = {**os.environ, **({"PYTHONPATH": str(src)} if src else {})}
        self.log = (root / "rems.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vims.cli", "rems", "serve", "--config",
             str(root / "rems.toml")], stdout=self.log, stderr=self.log, env=env,
            preexec_fn=lambda: resource.setrlimit(  # noqa: PLW1509 - setrlimit only
                resource.RLIMIT_NOFILE, (NOFILE, NOFILE)))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{self.gate}/openapi.json",
                                       timeout=1).close()
                socket.create_connection(("127.0.0.1", self.http), timeout=1).close()
                return
            time.sleep(0.2)
        raise RuntimeError("REM-S did not start")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return round(int(f.read().split("VmRSS:")[1].split()[0]) / 1024, 1)

    def tls(self) -> socket.socket:
        raw = socket.create_connection(("127.0.0.1", self.http), timeout=10)
        return ssl.create_default_context(cafile=str(self.ca)).wrap_socket(
            raw, server_hostname="127.0.0.1")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def request(rems: Rems, head: str, body: bytes = b"") -> None:
    with contextlib.suppress(OSError), rems.tls() as s:
        s.sendall(head.encode() + body)
        s.settimeout(5)
        s.recv(256)


def big_bodies(rems: Rems, stop: threading.Event) -> None:
    chunk = b"100000\r\n" + b"[" * 0x100000 + b"\r\n"
    while not stop.is_set():
        with contextlib.suppress(OSError), rems.tls() as s:
            s.sendall(b"PUT /v1/policies/x HTTP/1.1\r\nHost: r\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
            for _ in range(100):
                s.sendall(chunk)


def half_sent(rems: Rems, stop: threading.Event) -> None:
    held: list[socket.socket] = []
    for _ in range(1100):
        with contextlib.suppress(OSError):
            s = rems.tls()
            s.sendall(b"GET /v1/cvms HTTP/1.1\r\nHost: r\r\n")
            held.append(s)
    for _ in range(300):
        with contextlib.suppress(OSError):
            held.append(socket.create_connection(("127.0.0.1", rems.http), timeout=5))
    stop.wait()
    for s in held:
        s.close()


def bad_policies(rems: Rems, stop: threading.Event) -> None:
    bodies = ['{"checks": [{"id": "kernel.text"}], "quote_every": 0}',
              '{"checks": [{"id": "kernel.text"}], "stale_after_intervals": 1e308}',
              '{"checks": [{"id": "kernel.text", "interval_s": NaN}]}',
              '{"checks": [{"id": "kernel.text"}], "heartbeat_s": -1}']
    while not stop.is_set():
        for b in bodies:
            request(rems, f"PUT /v1/policies/bad HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer "
                          f"{rems.token}\r\nContent-Type: application/json\r\nContent-Length: "
                          f"{len(b)}\r\nConnection: close\r\n\r\n", b.encode())


def former_500s(rems: Rems, stop: threading.Event) -> None:
    bodies = [b'{"timeout_s": NaN}', b'{"timeout_s": 1e309}']
    while not stop.is_set():
        for b in bodies:
            request(rems, f"POST /v1/attest/cvm1 HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer "
                          f"{rems.token}\r\nContent-Type: application/json\r\nContent-Length: "
                          f"{len(b)}\r\nConnection: close\r\n\r\n", b)


def unserved_attests(rems: Rems, stop: threading.Event) -> None:
    body = b'{"timeout_s": 1}'
    while not stop.is_set():
        request(rems, f"POST /v1/attest/cvm1 HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer "
                      f"{rems.token}\r\nContent-Type: application/json\r\nContent-Length: "
                      f"{len(body)}\r\nConnection: close\r\n\r\n", body)


def bare_connects(rems: Rems, stop: threading.Event) -> None:
    for _ in range(10_000):
        if stop.is_set():
            return
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        with contextlib.suppress(OSError):
            s.connect(("127.0.0.1", rems.channel))
        s.close()


ATTACKS = {"none": None, "1 big unauthenticated bodies": big_bodies,
           "2 half-sent requests": half_sent, "4 bad policy values": bad_policies,
           "5 former 500s": former_500s, "6 unserved attests": unserved_attests,
           "7 bare TCP connects": bare_connects}


def phase(rems: Rems, attack: Any, seconds: float) -> dict[str, Any]:
    stop = threading.Event()
    worker = threading.Thread(target=attack, args=(rems, stop), daemon=True) if attack else None
    if worker:
        worker.start()
        time.sleep(1.0)  # the attack under way before the gate asks
    out = subprocess.run([sys.executable, __file__, "--probe", str(rems.gate), str(seconds)],
                         capture_output=True, text=True, timeout=seconds + 120, check=False)
    rss = rems.rss_mb() if rems.proc.poll() is None else None
    stop.set()
    if worker:
        worker.join(30)
    result: dict[str, Any] = json.loads(out.stdout) if out.stdout else {"error": out.stderr[-300:]}
    result["rems_rss_mb"] = rss
    result["rems_alive"] = rems.proc.poll() is None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="decision probe per phase")
    parser.add_argument("--src", type=Path, help="run the REM-S from this src directory")
    parser.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(int(args.probe[0]), float(args.probe[1]))
        return
    results: dict[str, Any] = {}
    for name, attack in ATTACKS.items():
        root = Path(tempfile.mkdtemp(prefix="vims-hostile-"))
        rems = Rems(root, args.src)  # a fresh REM-S per attack: no carry-over
        try:
            results[name] = phase(rems, attack, args.seconds)
        finally:
            rems.stop()
        print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
    print(json.dumps({"nofile": NOFILE, "seconds_per_phase": args.seconds,
                      "src": str(args.src or "this checkout"), "phases": results}, indent=1))


if __name__ == "__main__":
    main()
