"""The REM-S's channel policy per A-VM, and its report writer (batches, acks, failures)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from vims.protocol.core import RemsConnection, State
from vims.protocol.events import ReportReceived
from vims.protocol.messages import Capabilities, ChainHead, Hello, policy_digest
from vims.protocol.testing import report_body
from vims.rems.config import RemsConfig
from vims.rems.server import RemsServer

CAPABILITIES = Capabilities(checks=["kernel.text", "kernel.modules", "process.hidden"],
                            backends=["file"])


@pytest.fixture
def rems(tmp_path: Path) -> RemsServer:
    (tmp_path / "token").write_text("t" * 32)
    return RemsServer(RemsConfig(database=f"sqlite:///{tmp_path / 'rems.db'}",
                                 admin_token_file=tmp_path / "token", http_tls=False,
                                 signing_key=tmp_path / "ear.key"))


def hello(*cvms: str) -> Hello:
    return Hello(avm_id="avm1", cvms=list(cvms), capabilities=CAPABILITIES)


def test_each_cvm_gets_its_own_policys_checks(rems: RemsServer) -> None:
    rems.store.put_policy("web", {"checks": [{"id": "kernel.text", "interval_s": 2},
                                             {"id": "process.hidden", "interval_s": 5}],
                                  "quote_every": 4, "heartbeat_s": 3})
    rems.store.put_policy("db", {"checks": [{"id": "kernel.text", "interval_s": 2},
                                            {"id": "behaviour.unknown", "interval_s": 1}],
                                 "quote_every": 2})
    rems.store.assign("cvm-web", "web")
    rems.store.assign("cvm-db", "db")
    spec = rems.policy_for(hello("cvm-web", "cvm-db"))
    got = {(c.id, c.interval_s, tuple(c.cvms) if c.cvms else None) for c in spec.checks}
    assert got == {("kernel.text", 2.0, None),  # both C-VMs: no C-VM list
                   ("process.hidden", 5.0, ("cvm-web",))}
    assert [c.id for c in spec.checks if c.applies_to("cvm-db")] == ["kernel.text"]
    assert (spec.quote_every, spec.heartbeat_s) == (2, 3.0)  # the strictest of the two
    assert spec.policy_id.startswith("multi-")


def test_one_policy_keeps_its_name_and_unknown_checks_fall_back(rems: RemsServer) -> None:
    rems.store.put_policy("lab", {"checks": [{"id": "kernel.modules", "interval_s": 7}]})
    rems.store.assign("a", "lab")
    rems.store.assign("b", "lab")
    spec = rems.policy_for(hello("a", "b"))
    assert spec.policy_id == "lab"
    assert [(c.id, c.cvms) for c in spec.checks] == [("kernel.modules", None)]
    # A C-VM whose policy names nothing this A-VM can run is never given an empty round.
    rems.store.put_policy("odd", {"checks": [{"id": "behaviour.unknown", "interval_s": 1}]})
    rems.store.assign("b", "odd")
    spec = rems.policy_for(hello("a", "b"))
    assert sorted(c.id for c in spec.checks if c.applies_to("b")) == sorted(CAPABILITIES.checks)
    assert [c.id for c in spec.checks if c.applies_to("a")] == ["kernel.modules"]


def test_check_params_reach_the_a_vm_and_opt_in_checks_are_never_a_fallback(
        rems: RemsServer) -> None:
    caps = Capabilities(checks=["kernel.text", "behaviour.trace"], backends=["file"])
    model = "sha256:" + "ab" * 32
    rems.store.put_policy("traced", {"checks": [
        {"id": "behaviour.trace", "interval_s": 2, "params": {"model": model, "gate": True}}]})
    rems.store.assign("a", "traced")
    spec = rems.policy_for(Hello(avm_id="avm1", cvms=["a", "b"], capabilities=caps))
    assert [(c.id, c.params, c.cvms) for c in spec.checks if c.applies_to("a")] == [
        ("behaviour.trace", {"model": model, "gate": True}, ["a"])]
    # "b" has no policy: every check the A-VM can run, except those needing parameters.
    assert [c.id for c in spec.checks if c.applies_to("b")] == ["kernel.text"]


def test_policy_digest_changes_only_with_the_policy(rems: RemsServer) -> None:
    rems.store.put_policy("lab", {"checks": [{"id": "kernel.text", "interval_s": 5}]})
    rems.store.assign("a", "lab")
    first = policy_digest(rems.policy_for(hello("a")))
    assert policy_digest(rems.policy_for(hello("a"))) == first  # nothing to push
    rems.store.put_policy("lab", {"checks": [{"id": "kernel.text", "interval_s": 1}]})
    assert policy_digest(rems.policy_for(hello("a"))) != first


class FakeSession:
    """What the REM-S writer uses of a channel session: its core, poke and close."""

    def __init__(self, conn: object) -> None:
        self.conn, self.closed, self.pokes = conn, "", 0

    def now(self) -> float:
        return 0.0

    def poke(self) -> None:
        self.pokes += 1

    def close(self, reason: str = "") -> None:
        self.closed = reason


def test_writer_acks_after_storing_and_one_poisoned_report_costs_only_its_own(
        rems: RemsServer) -> None:
    """Acks only once stored. A batch that fails is stored again report by report: the
    report that fails on its own is never acked, its session dropped and its chain head
    forgotten (the A-VM resends from the stored head); the other A-VM's report in the
    same batch is stored and acked."""
    acks: list[tuple[str, int]] = []

    class Core(RemsConnection):
        def __init__(self) -> None:  # only what the writer touches
            self._state = State.ACTIVE

        def ack_report(self, cvm: str, seq: int, now: float) -> None:
            acks.append((cvm, seq))

    good, bad = FakeSession(Core()), FakeSession(Core())
    rems.store.bind("a", "avm1")
    rems.store.bind("b", "avm2")
    real = rems.service.ingest

    def poisoned(items: Any, *args: Any) -> Any:
        if any(i.cvm == "b" for i in items):
            raise ValueError("cannot store this one")
        return real(items, *args)

    rems.service.ingest = poisoned  # type: ignore[method-assign]

    def event(avm: str, cvm: str, seq: int) -> ReportReceived:
        return ReportReceived(avm, cvm, seq, f"{seq:064x}", False, report_body())

    async def scenario() -> None:
        rems.ledger.heads[("avm2", "b")] = ChainHead(seq=1, digest="1" * 64)
        rems.on_event(bad, event("avm2", "b", 1))  # type: ignore[arg-type]
        rems.on_event(good, event("avm1", "a", 1))  # type: ignore[arg-type]
        writer = asyncio.create_task(rems._writer())  # both in one batch
        await asyncio.sleep(0.3)
        writer.cancel()

    asyncio.run(scenario())
    assert acks == [("a", 1)]  # the poisoned report was never acked
    assert bad.closed
    assert not good.closed
    assert ("avm2", "b") not in rems.ledger.heads  # reloaded from the store on reconnect
    assert [r["seq"] for r in rems.store.reports("a")] == [1]
    assert rems.store.reports("b") == []


def test_reports_of_a_cvm_not_bound_to_the_reporting_a_vm_are_not_stored(
        rems: RemsServer) -> None:
    """The binding is checked again when storing: a C-VM moved away mid-session."""
    acks: list[tuple[str, int]] = []

    class Core(RemsConnection):
        def __init__(self) -> None:
            self._state = State.ACTIVE

        def ack_report(self, cvm: str, seq: int, now: float) -> None:
            acks.append((cvm, seq))

    old = FakeSession(Core())
    rems.store.bind("a", "avm2")  # the operator gave C-VM a to avm2

    async def scenario() -> None:
        rems.on_event(old, ReportReceived("avm1", "a", 1, "1" * 64, False,  # type: ignore[arg-type]
                                          report_body()))
        writer = asyncio.create_task(rems._writer())
        await asyncio.sleep(0.3)
        writer.cancel()

    asyncio.run(scenario())
    assert acks == []
    assert "not bound" in old.closed
    assert rems.store.reports("a") == []
    assert any(e["kind"] == "refused" for e in audit_entries(rems))


def audit_entries(rems: RemsServer) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from vims.rems import schema

    with rems.store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(schema.audit))]


def test_timed_out_attest_rounds_give_their_slots_back(rems: RemsServer) -> None:
    """An A-VM that never answers: 20 rounds time out (504), then one more is asked
    (before, every attest after 16 timeouts was a 503 for the channel's lifetime)."""
    from vims.protocol.testing import Pair
    from vims.rems.api import AttestFailed

    pair = Pair()
    pair.handshake()
    asked: list[str] = []

    class Silent:  # the session of an A-VM that never answers a round request
        conn = pair.rems

        def request_round(self, cvm: str) -> str:
            request_id = pair.rems.request_round(cvm, pair.clock.now)
            asked.append(request_id)
            return request_id

    rems.sessions["web"] = Silent()  # type: ignore[assignment]

    async def scenario() -> list[int]:
        codes = []
        for _ in range(21):
            try:
                await rems.attest("web", 0.01)
            except AttestFailed as exc:
                codes.append(exc.status)
        return codes

    assert asyncio.run(scenario()) == [504] * 21
    assert len(asked) == 21  # every round was really asked, none refused for slots
