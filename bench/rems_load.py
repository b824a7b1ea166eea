"""Benchmark: REM-S under N simulated A-VMs over real mutual TLS with real TPM quotes.

Run::

    .venv/bin/python bench/rems_load.py --n 10,100,1000 --duration 15

It prints one JSON object: per N, the acked (= verified and stored) reports per
second, the fraction of reports that carried a TPM quote, p50/p99 latency of
``GET /v1/decision/{cvm}`` measured while the load runs, REM-S RSS idle /
with N connected A-VMs / under load, RSS per connected A-VM, the time to
complete N handshakes, and the CPU use of the REM-S and of the load generator.
It is a benchmark, not a test: nothing is asserted.

What is real and what is simulated
----------------------------------
* REAL: the REM-S is the production ``vims rems serve`` process (separate
  process, its own event loop, SQLite store, EAR signing key, uvicorn HTTP API)
  configured as :func:`vims.lab.deploy.deploy` configures it. Every connection
  is TLS 1.3 with a client certificate issued by the REM-S CA to that A-VM's id
  (N certificates issued up front). Every handshake carries a fresh TPM2_Quote
  from a real swtpm over the REM-S's session nonce, covering PCR 17 (DRTM launch,
  checked against the golden value) and PCR 23 (agent measurements, whose event
  log the REM-S replays), bound to that connection's TLS channel. Every report
  quote (every ``quote_every``-th report) is a real TPM2_Quote over
  SHA256(nonce || report digest) with its TPM counters and PCRs checked against
  the handshake's. The REM-S verifies each of them with its pure-Python ECDSA
  quote verifier, checks each C-VM's binding, stores every report in SQLite and
  appraises its C-VM over every check of its policy (the latest result of each
  check, merged in the storing transaction), exactly as in production; EARs are
  signed when the decision probe asks.
* SIMULATED: all N A-VMs share ONE swtpm and therefore ONE AK; that AK is
  enrolled for real (EK chain + credential activation) for the first avm id and
  its public key is then enrolled (``Store.enroll``) for every other id. The
  REM-S work per quote is unchanged by this (it looks up the enrolled AK by
  avm id and verifies the signature). All A-VMs live in one load-generator
  process (one asyncio loop), and the swtpm is single-client, so quotes are made
  one at a time, synchronously, from that loop (~1.5-3 ms each). Report bodies
  are synthetic but shaped like a ``vims check`` round (10 checks, no findings,
  no process list). Each A-VM guards one C-VM (bound to it in the store). The
  shared vTPM's PCR 23 log is empty (it cannot name every A-VM), so the REM-S
  runs with ``insecure_lab`` and takes the missing reference digests as notes:
  those are dictionary lookups, not a cost this benchmark misses.
* The machine is shared: REM-S, load generator and the decision probe process
  compete for the same cores, so the figures are a lower bound for a REM-S
  with the machine to itself.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vims.avm.evidence import VtpmEvidence
from vims.lab.deploy import write_rems_config, write_rems_pki
from vims.protocol.core import AvmConnection
from vims.protocol.events import ConnectionClosed, Event, HandshakeComplete, ReportAcked
from vims.protocol.messages import Capabilities, Evidence, Quote
from vims.protocol.pki import CertificateAuthority, client_context
from vims.protocol.transport import Session, connect
from vims.rems.config import load as load_rems_config
from vims.rems.enroll import enroll
from vims.rems.store import Store
from vims.tpm.ekca import EkCa
from vims.tpm.swtpm import Swtpm

LAUNCH_DATA = b"vims bench measured launch (simulated DRTM)"
CHECKS = ["kernel.text", "kernel.syscall_table", "kernel.idt", "kernel.modules",
          "process.hidden", "process.creds", "file.ops", "net.hooks", "kernel.ftrace",
          "kernel.kprobes"]
CATEGORY = {"kernel": "executables", "process": "runtime-opaque", "file": "file-system",
            "net": "configuration"}


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report_body(i: int) -> dict[str, Any]:
    """A report shaped like one ``vims check`` round: 10 checks, clean, no process list."""
    return {
        "result": "pass",
        "round": i,
        "started_at": time.time(),
        "checks": [{"id": c, "category": CATEGORY[c.split(".")[0]], "status": "pass",
                    "duration_ms": 3.2, "items": 42} for c in CHECKS],
        "findings": [],
        "processes": [],
        "modules": [],
    }


# --------------------------------------------------------------- deployment
@dataclass
class Deployment:
    root: Path
    ca: CertificateAuthority
    swtpm: Swtpm
    vtpm: VtpmEvidence
    pcr17: str
    ak_pem: str = ""
    ek_cert_pem: str | None = None
    token: str = field(default_factory=lambda: secrets.token_hex(24))
    certs: list[Path] = field(default_factory=list)

    @property
    def pki(self) -> Path:
        return self.root / "pki"


def setup(root: Path, max_n: int) -> Deployment:
    """CA, server cert, N client certs, one manufactured swtpm with DRTM PCR 17 and an AK."""
    pki = root / "pki"
    ca = write_rems_pki(pki)
    tpm_ca, _ = EkCa.init(root / "ek-ca")
    swtpm = Swtpm(root / "swtpm", tpm_ca)
    swtpm.manufacture()
    swtpm.start()
    pcr17 = swtpm.drtm_measure(LAUNCH_DATA).hex()
    vtpm = VtpmEvidence(swtpm.tcti)
    vtpm.measure_launch([])  # PCR 23 reset, nothing measured (see the module doc)
    dep = Deployment(root=root, ca=ca, swtpm=swtpm, vtpm=vtpm, pcr17=pcr17)
    (root / "admin.token").write_text(dep.token + "\n")
    (root / "admin.token").chmod(0o600)
    for i in range(max_n):
        cert = pki / f"avm-{i:05d}.pem"
        ca.issue_client(avm_name(i)).write(cert, pki / f"avm-{i:05d}.key")
        dep.certs.append(cert)
    return dep


def avm_name(i: int) -> str:
    return f"avm-{i:05d}"


def cvm_name(i: int) -> str:
    return f"cvm-{i:05d}"


def write_config(dep: Deployment, run: Path) -> tuple[Path, int, int]:
    """The REM-S config; returns it, the channel port and the (plain, loopback) gate port."""
    run.mkdir(parents=True)
    tpm_ca = dep.swtpm.ca
    assert tpm_ca is not None
    cfg = run / "rems.toml"
    channel, _https, gate = write_rems_config(
        cfg, state=run, pki=dep.pki, token_file=dep.root / "admin.token",
        ek_ca_certs=tpm_ca.ca_cert_paths, pcr17_hex=dep.pcr17, verdict_ttl_s=30)
    cfg.write_text(cfg.read_text().replace("[rems.tls]", "insecure_lab = true\n\n[rems.tls]"))
    return cfg, channel, gate


def enroll_all(dep: Deployment, cfg_path: Path, n: int) -> None:
    """Real enrollment (EK chain, credential activation) of avm 0; its AK for the others.

    The copies carry no EK certificate: the REM-S verifies quotes against the AK only.
    """
    cfg = load_rems_config(cfg_path)
    store = Store(cfg.database)
    if not dep.ak_pem:
        enroll(store, avm_name(0), dep.vtpm.attester, cfg.ek_ca_certs)
        dep.ak_pem = store.ak_of(avm_name(0)) or ""
    else:
        store.enroll(avm_name(0), dep.ak_pem, dep.ek_cert_pem)
    for i in range(1, n):
        store.enroll(avm_name(i), dep.ak_pem, dep.ek_cert_pem)
    for i in range(n):
        store.bind(cvm_name(i), avm_name(i))
    store.engine.dispose()


def start_rems(cfg: Path, http: int, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vims.cli", "rems", "serve", "--config", str(cfg)],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"REM-S exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http}/openapi.json", timeout=1).close()
            return proc
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    stop(proc)
    raise RuntimeError("REM-S did not answer")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def put_json(http: int, path: str, token: str, body: dict[str, Any]) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{http}{path}", method="PUT",
                                 data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        status: int = r.status
        return status


# ------------------------------------------------------------ load generator
@dataclass
class Counters:
    running: bool = False
    window: int = 4
    acked: int = 0
    quotes: int = 0
    handshake_quotes: int = 0
    closed: list[str] = field(default_factory=list)


class SimAvm:
    """One simulated A-VM: its own TLS identity, one C-VM, the shared vTPM."""

    def __init__(self, i: int, dep: Deployment, counters: Counters) -> None:
        self.i = i
        self.cvm = cvm_name(i)
        self.dep = dep
        self.c = counters
        self.ready = asyncio.Event()
        self.session: Session | None = None
        self.task: asyncio.Task[None] | None = None
        self.in_flight = 0
        self.sent = 0
        cert = dep.certs[i]
        self.ctx: ssl.SSLContext = client_context(cert, cert.with_suffix(".key"),
                                                  dep.pki / "ca.pem")

    def make_evidence(self, nonce: bytes) -> Evidence:
        self.c.handshake_quotes += 1
        return self.dep.vtpm.make_evidence(nonce)  # real TPM2_Quote over this session's nonce

    def quote_report(self, qualifying_data: bytes) -> Quote:
        self.c.quotes += 1
        return self.dep.vtpm.quote_report(qualifying_data)

    def on_event(self, session: Session, event: Event) -> None:
        if isinstance(event, HandshakeComplete):
            self.ready.set()
        elif isinstance(event, ReportAcked):
            self.in_flight -= 1
            if self.c.running:
                self.c.acked += 1
                self.fill(session)
        elif isinstance(event, ConnectionClosed):
            self.c.closed.append(event.reason)
            self.ready.set()

    def fill(self, session: Session) -> None:
        while self.c.running and self.in_flight < self.c.window:
            self.in_flight += 1
            self.sent += 1
            session.send_report(self.cvm, report_body(self.sent))

    async def open(self, port: int) -> None:
        conn = AvmConnection(
            avm_id=avm_name(self.i), cvms=[self.cvm],
            capabilities=Capabilities(checks=CHECKS, backends=["xen"]),
            make_evidence=self.make_evidence, quote_report=self.quote_report)
        self.session, self.task = await connect("127.0.0.1", port, self.ctx, conn,
                                                self.on_event, server_hostname="rems")
        await asyncio.wait_for(self.ready.wait(), 60)
        if self.session.conn.closed:
            raise RuntimeError(f"{avm_name(self.i)} closed in handshake: {self.c.closed[-1:]}")


def probe_decisions(http: int, n: int, count: int) -> subprocess.Popen[bytes]:
    """The decision probe runs in its own process so its timing is not the load loop's."""
    return subprocess.Popen([sys.executable, __file__, "--probe", str(http), str(n),
                             str(count)], stdout=subprocess.PIPE)


def probe_main(port: int, n: int, count: int, budget_s: float = 45.0) -> None:
    """Sequential GETs on one keep-alive connection; timeouts are counted, not fatal."""
    lat: list[float] = []
    statuses: dict[str, int] = {}
    conn: http.client.HTTPConnection | None = None
    end = time.monotonic() + budget_s
    for k in range(count):
        if time.monotonic() > end:
            break
        conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        t = time.perf_counter()
        try:
            conn.request("GET", f"/v1/decision/{cvm_name(k % n)}")
            resp = conn.getresponse()
            resp.read()
            key = str(resp.status)
        except (OSError, http.client.HTTPException) as exc:
            key = type(exc).__name__
            conn.close()
            conn = None
        lat.append((time.perf_counter() - t) * 1000)
        statuses[key] = statuses.get(key, 0) + 1
    if conn is not None:
        conn.close()
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else lat * 99
    print(json.dumps({"p50": round(statistics.median(lat), 2), "p99": round(q[98], 2),
                      "max": round(max(lat), 2), "requests": len(lat), "status": statuses}))


async def load(dep: Deployment, proc: subprocess.Popen[bytes], port: int, http: int, n: int,
               duration: float, window: int, probe_count: int,
               concurrency: int) -> dict[str, Any]:
    counters = Counters(window=window)
    rss_idle = rss_kb(proc.pid)
    avms = [SimAvm(i, dep, counters) for i in range(n)]
    sem = asyncio.Semaphore(concurrency)
    errors: list[str] = []

    async def open_one(a: SimAvm) -> None:
        async with sem:
            try:
                await a.open(port)
            except (OSError, ssl.SSLError, RuntimeError, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    await asyncio.gather(*(open_one(a) for a in avms))
    handshake_s = time.perf_counter() - t0
    connected = [a for a in avms if a.session is not None and not a.session.conn.closed]
    await asyncio.sleep(2.0)  # let the REM-S settle (GC, buffers) before reading RSS
    rss_connected = rss_kb(proc.pid)

    # ---- load window
    counters.running = True
    for a in connected:
        assert a.session is not None
        a.fill(a.session)
    await asyncio.sleep(1.0)  # warm-up, not counted
    counters.acked, counters.quotes = 0, 0
    cpu_rems0, cpu_self0 = cpu_s(proc.pid), cpu_s(os.getpid())
    t1 = time.perf_counter()
    probe = probe_decisions(http, n, probe_count)
    rss_loaded = 0
    while time.perf_counter() - t1 < duration:
        await asyncio.sleep(0.5)
        rss_loaded = max(rss_loaded, rss_kb(proc.pid))
    elapsed = time.perf_counter() - t1
    acked, quotes = counters.acked, counters.quotes
    cpu_rems, cpu_self = cpu_s(proc.pid) - cpu_rems0, cpu_s(os.getpid()) - cpu_self0
    counters.running = False
    closed_in_run = len(counters.closed) - (n - len(connected))
    # The probe may still run if the loop starved it; bounded wait, then kill it.
    try:
        out, _ = await asyncio.to_thread(probe.communicate, None, 60)
        decision = json.loads(out) if out else {"error": "probe produced nothing"}
    except subprocess.TimeoutExpired:
        probe.kill()
        probe.wait()
        decision = {"error": "probe timed out"}

    # ---- drain and close
    await asyncio.sleep(1.0)
    for a in connected:
        if a.session is not None:
            a.session.close("bench done")
    tasks = [a.task for a in avms if a.task is not None]
    if tasks:
        await asyncio.wait(tasks, timeout=20)
    return {
        "n_avms": n,
        "connected": len(connected),
        "connect_errors": len(errors),
        "first_errors": errors[:3],
        "closed_during_run": closed_in_run,
        "reports_per_s": round(acked / elapsed, 1),
        "reports_acked": acked,
        "window_s": round(elapsed, 2),
        "quoted_fraction": round(quotes / acked, 4) if acked else None,
        "report_quotes_verified": quotes,
        "decision_latency_ms": decision,
        "rems_rss_mb_idle": round(rss_idle / 1024, 1),
        "rems_rss_mb_connected": round(rss_connected / 1024, 1),
        "rems_rss_mb_loaded": round(rss_loaded / 1024, 1),
        "rss_kb_per_avm": round((rss_connected - rss_idle) / max(1, len(connected)), 1),
        "handshake_s_for_n": round(handshake_s, 2),
        "handshakes_per_s": round(len(connected) / handshake_s, 1) if handshake_s else None,
        "rems_cpu_pct": round(100 * cpu_rems / elapsed, 1),
        "loadgen_cpu_pct": round(100 * cpu_self / elapsed, 1),
    }


def run_one(dep: Deployment, n: int, args: argparse.Namespace) -> dict[str, Any]:
    run = dep.root / f"run-{n}"
    cfg, channel, http = write_config(dep, run)
    enroll_all(dep, cfg, n)
    proc = start_rems(cfg, http, run / "rems.log")
    try:
        policy = {"checks": [{"id": c, "interval_s": 10} for c in CHECKS],
                  "quote_every": args.quote_every, "heartbeat_s": 30}
        put_json(http, "/v1/policies/default", dep.token, policy)  # policy_for falls back here
        return asyncio.run(load(dep, proc, channel, http, n, args.duration, args.window,
                                args.probe, args.concurrency))
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="10,100,1000", help="comma-separated A-VM counts")
    parser.add_argument("--duration", type=float, default=15.0, help="load window per N (s)")
    parser.add_argument("--window", type=int, default=4, help="unacked reports per A-VM")
    parser.add_argument("--quote-every", type=int, default=100)
    parser.add_argument("--probe", type=int, default=500, help="decision GETs per N")
    parser.add_argument("--concurrency", type=int, default=64, help="handshakes in flight")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args()
    counts = [int(x) for x in args.n.split(",")]
    nofile = raise_nofile()  # inherited by the REM-S child
    root = Path(tempfile.mkdtemp(prefix="vims-rems-load-"))
    results: list[dict[str, Any]] = []
    t_setup = time.perf_counter()
    dep = setup(root, max(counts))
    setup_s = time.perf_counter() - t_setup
    try:
        for n in counts:
            try:
                results.append(run_one(dep, n, args))
            except Exception as exc:  # noqa: BLE001 - report what was reached, keep going
                results.append({"n_avms": n, "error": f"{type(exc).__name__}: {exc}"})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        dep.vtpm.close()
        dep.swtpm.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "kernel": platform.release(),
                    "nofile": list(nofile)},
        "settings": {"duration_s": args.duration, "window": args.window,
                     "quote_every": args.quote_every, "probe_requests": args.probe,
                     "handshake_concurrency": args.concurrency, "store": "sqlite",
                     "shared_vtpm": True, "setup_s": round(setup_s, 1)},
        "goals": {"reports_per_s": 2500, "connected_avms": 1000},
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--probe":
        probe_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
