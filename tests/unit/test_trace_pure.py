"""The tracer's pure parts: the GDB remote protocol framing, the instructions it performs
itself, models (learn, enforce, files, digests) and the opt-in check set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vims.checks import ALL_CHECKS, DEFAULT_CHECKS
from vims.protocol.messages import OPT_IN_CHECKS
from vims.trace.gdbstub import GdbError, checksum, decode_body, escape, parse_stop
from vims.trace.model import Enforcer, Learner, Model, ModelError, find_model, normalise_digest
from vims.trace.session import trace_settings
from vims.trace.tracer import Instruction, SyscallEvent, TraceError, app_globs, kernel_gs_base


def test_packets_escape_checksum_and_run_length() -> None:
    assert checksum(b"OK") == b"9a"
    assert escape(b"a#b$c}d*") == b"a}\x03b}\x04c}]d}\x0a"
    assert decode_body(escape(b"a#b$c}d*")) == b"a#b$c}d*"
    assert decode_body(b"0* ") == b"0000"  # '0' then 3 more (' ' is 32 = 29 + 3)
    with pytest.raises(GdbError):
        decode_body(b"0*~" * 20000)  # a run-length bomb stays within the packet bound


def test_the_kernel_gs_base_is_the_one_in_the_kernel_half() -> None:
    percpu = 0xFFFF_8880_3E60_0000
    assert kernel_gs_base({"cs": 0x10, "gs_base": percpu, "k_gs_base": 0}) == percpu
    assert kernel_gs_base({"cs": 0x33, "gs_base": 0, "k_gs_base": percpu}) == percpu
    # ring 0 between SYSCALL and SWAPGS: the user's GS is still loaded (the CI failure
    # "cannot read 1 bytes at 0x1fb80" was current_task read at 0 + its per-CPU offset)
    assert kernel_gs_base({"cs": 0x10, "gs_base": 0x7F12_3456_0000, "k_gs_base": percpu}) \
        == percpu
    assert kernel_gs_base({"cs": 0x10, "gs_base": 0, "k_gs_base": 0}) is None
    assert kernel_gs_base({"cs": 0x10, "gs_base": 0}) is None  # a stub without k_gs_base


def test_stop_replies() -> None:
    assert parse_stop(b"T05thread:p01.01;").trap
    assert parse_stop(b"T05thread:p01.02;swbreak:;").thread == "p01.02"
    assert parse_stop(b"S05").thread is None
    assert parse_stop(b"S02").signal == 2
    assert parse_stop(b"W00").exited
    with pytest.raises(GdbError):
        parse_stop(b"OK")


@pytest.mark.parametrize(("code", "length", "push"), [
    ("0f1f440000415641", 5, None),  # the ftrace NOP at a traceable function's entry
    ("f30f1efa55", 4, None),        # endbr64
    ("554889e5", 1, "rbp"),
    ("415765488b", 2, "r15"),
    ("4889e5", 0, None),             # anything else is single-stepped
])
def test_instructions_under_a_breakpoint(code: str, length: int, push: str | None) -> None:
    insn = Instruction.decode(bytes.fromhex(code))
    assert (insn.length, insn.push) == (length, push)


def ev(pid: int, name: str, arg: str | None = None, app: str = "httpd") -> SyscallEvent:
    return SyscallEvent(0.0, app, pid, pid, "httpd", 0, name, (), arg)


def serve(pid: int, page: str) -> list[SyscallEvent]:
    return [ev(pid, "accept"), ev(pid, "read"), ev(pid, "openat", page), ev(pid, "sendfile64"),
            ev(pid, "close"), ev(pid, "exit_group")]


def learned(generalise: int = 3) -> Model:
    learner = Learner({"httpd": ["httpd"]}, n=3, generalise=generalise)
    for pid, page in enumerate(["/www/a.html", "/www/b.html", "/www/c.html", "/etc/x"], 100):
        for e in serve(pid, page):
            learner.feed(e)
    return learner.model(kernel="6.1", training={"events": 24})


def test_learning_per_thread_windows_and_path_folding() -> None:
    model = learned()
    app = model.apps["httpd"]
    assert ["accept", "read", "openat"] in app.ngrams
    assert ["close", "exit_group", "accept"] not in app.ngrams  # windows end with the thread
    assert app.open == ["/etc/x", "/www/*"]  # three files in /www fold; /etc stays exact
    assert learned(generalise=0).apps["httpd"].open[-1] == "/www/c.html"


def test_interleaved_threads_do_not_make_new_sequences() -> None:
    enforcer = Enforcer(learned())
    a, b = serve(1, "/www/a.html"), serve(2, "/www/new.html")
    mixed = [e for pair in zip(a, b, strict=True) for e in pair]
    assert [v for e in mixed for v in enforcer.feed(e)] == []


def test_a_gap_in_tracing_breaks_no_sequence() -> None:
    enforcer = Enforcer(learned())
    first, second = serve(1, "/www/a.html")[:2], serve(1, "/www/a.html")[3:]
    for e in first:
        assert enforcer.feed(e) == []
    enforcer.gap()  # the tracer was detached meanwhile: "read close" never happened
    assert [v for e in second for v in enforcer.feed(e)] == []


def test_enforcing_a_reverse_shell() -> None:
    enforcer = Enforcer(learned())
    found = []
    for e in [ev(7, "accept"), ev(7, "read"), ev(7, "socket"),
              ev(7, "connect", "inet:10.0.2.2:4444"), ev(7, "dup2"), ev(7, "execve", "/bin/sh"),
              ev(7, "openat", "/etc/shadow")]:
        found += enforcer.feed(e)
    kinds = {(v.kind, v.detail) for v in found}
    assert {("syscall", "socket"), ("connect", "inet:10.0.2.2:4444"), ("exec", "/bin/sh"),
            ("open", "/etc/shadow")} <= kinds
    assert "connect inet:10.0.2.2:4444 not in the model" in next(
        v.summary() for v in found if v.kind == "connect")
    # Reported once per process, again for another process.
    assert enforcer.feed(ev(7, "execve", "/bin/sh")) == []
    assert [v.kind for v in enforcer.feed(ev(8, "execve", "/bin/sh"))] == ["syscall", "exec"]
    # Applications the model does not name are not judged.
    assert enforcer.feed(ev(9, "execve", "/bin/sh", app="sshd")) == []


def test_model_files_digests_and_refusals(tmp_path: Path) -> None:
    model = learned()
    path = tmp_path / "m.json"
    model.save(path)
    again = Model.load(path)
    assert again.digest == model.digest
    assert again.digest.startswith("sha256:")
    assert find_model(tmp_path, model.digest.removeprefix("sha256:")).digest == model.digest
    edited = json.loads(path.read_text())
    edited["apps"]["httpd"]["exec"] = ["/bin/sh"]
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    assert Model.load(tmp_path / "edited.json").digest != model.digest  # any edit shows
    with pytest.raises(ModelError, match="no model with digest"):
        find_model(tmp_path, "sha256:" + "0" * 64)
    (tmp_path / "bad.json").write_text('{"apps": {"x": {"comm": []}}}')
    with pytest.raises(ModelError, match="not a behaviour model"):
        Model.load(tmp_path / "bad.json")
    with pytest.raises(ModelError, match="not a sha256"):
        normalise_digest("sha256:xyz")
    with pytest.raises(ModelError, match="nothing to learn"):
        Learner({"httpd": ["httpd"]}).model()


def test_app_selection_and_opt_in_checks() -> None:
    assert app_globs({"web": ["httpd", "lighttpd"], "cron": None}) == {
        "web": ["httpd", "lighttpd"], "cron": ["cron"]}
    opt_in = {cid for cid, c in ALL_CHECKS.items() if not c.default}
    assert opt_in == set(OPT_IN_CHECKS)  # the REM-S and the A-VM agree
    assert not opt_in & set(DEFAULT_CHECKS)


@pytest.mark.parametrize(("args", "message"), [
    (["show", "{tmp}/none.json"], "does not exist"),
    (["show", "{tmp}/empty.json"], "not a behaviour model"),
    (["trace", "--memory", "{tmp}/ram", "--gdb", "{tmp}/gdb", "--profile", "{tmp}/p.json",
      "--app", "bad name!"], "give NAME or NAME=GLOB"),
    (["learn", "--gdb", "{tmp}/gdb", "--profile", "{tmp}/p.json", "--app", "httpd",
      "--out", "{tmp}/m.json"], "give --lab NAME, or --memory"),
])
def test_behaviour_cli_refuses_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty.json").write_text('{"apps": {}}')
    proc = subprocess.run([sys.executable, "-m", "vims.cli", "behaviour",
                           *(a.format(tmp=tmp_path) for a in args)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_tracing_settings_from_policy_params() -> None:
    assert trace_settings({}) == (False, 1.0, 10.0)
    assert trace_settings({"gate": True, "duty": 0.1, "period_s": 30}) == (True, 0.1, 30.0)
    for bad in ({"duty": 0}, {"duty": 2}, {"period_s": 0.5}, {"duty": "half"}):
        with pytest.raises(TraceError):
            trace_settings(bad)
