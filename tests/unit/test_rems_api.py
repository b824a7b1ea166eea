"""REM-S decisions and HTTP API: fail closed, EAR on 200, authenticated writes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient

from vims.rems.api import create_app
from vims.rems.service import RemsService
from vims.rems.store import GENESIS, DuplicateReport, Store

TOKEN = "s3cret-operator-token"
KEY = ec.generate_private_key(ec.SECP256R1())


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def report(findings: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"result": "fail" if findings else "pass",
            "checks": [{"id": "kernel.syscall_table", "category": "executables",
                        "status": "fail" if findings else "pass"}],
            "findings": findings or [], "processes": [], "modules": []}


HOOK = {"check": "kernel.syscall_table", "severity": "critical", "summary": "syscall 39 hooked"}


@pytest.fixture
def rems(tmp_path: Path) -> tuple[RemsService, TestClient, Clock]:
    clock = Clock()
    service = RemsService(Store(f"sqlite:///{tmp_path / 'r.db'}"), KEY, clock=clock)
    return service, TestClient(create_app(service, TOKEN), client=("127.0.0.1", 40000)), clock


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_unknown_cvm_is_denied(rems: tuple[RemsService, TestClient, Clock]) -> None:
    _, client, _ = rems
    r = client.get("/v1/decision/cvm1")
    assert r.status_code == 403
    assert "unknown" in r.headers["x-vims-reason"]


def test_clean_then_attacked_then_stale(rems: tuple[RemsService, TestClient, Clock]) -> None:
    service, client, clock = rems
    assert client.put("/v1/policies/lab", headers=AUTH, json={
        "checks": [{"id": "kernel.syscall_table", "interval_s": 2}],
        "stale_after_intervals": 3}).status_code == 200
    assert client.put("/v1/cvms/cvm1/policy", headers=AUTH,
                      json={"policy": "lab"}).status_code == 200
    service.ingest_report("avm1", "cvm1", 1, GENESIS, report())
    ok = client.get("/v1/decision/cvm1")
    assert ok.status_code == 200
    claims = jwt.decode(ok.text, jwt.PyJWK(client.get("/.well-known/jwks.json").json()["keys"][0])
                        .key, algorithms=["ES256"], options={"verify_exp": False})
    assert claims["submods"]["cvm1"]["ear_status"] == "affirming"
    assert claims["submods"]["cvm1"]["ear_appraisal_policy_ids"] == ["policy:lab@1"]
    assert claims["submods"]["cvm1"]["vims_checks"] == {"kernel.syscall_table": "pass"}
    assert claims["exp"] - claims["iat"] == 6  # 3 x the 2 s interval

    service.ingest_report("avm1", "cvm1", 2, GENESIS, report([HOOK]))
    denied = client.get("/v1/decision/cvm1")
    assert denied.status_code == 403
    assert denied.headers["x-vims-status"] == "contraindicated"

    service.ingest_report("avm1", "cvm1", 3, GENESIS, report())
    assert client.get("/v1/decision/cvm1").status_code == 200
    clock.now += 6.5  # the A-VM went silent: the verdict lapses
    stale = client.get("/v1/decision/cvm1")
    assert stale.status_code == 403
    assert "stale" in stale.headers["x-vims-reason"]
    with pytest.raises(DuplicateReport):
        service.ingest_report("avm1", "cvm1", 3, GENESIS, report())

    assert client.get("/v1/cvms").status_code == 401  # reads need a token too
    listed = client.get("/v1/cvms", headers=AUTH).json()
    assert listed[0]["cvm"] == "cvm1"
    assert listed[0]["allowed"] is False
    assert client.get("/v1/cvms/cvm1/reports").status_code == 401
    assert [r["seq"] for r in client.get("/v1/cvms/cvm1/reports?limit=2",
                                         headers=AUTH).json()] == [3, 2]
    page = client.get("/")
    assert page.status_code == 200
    assert "cvm1" in page.text
    assert "denied" in page.text


def test_writes_need_the_operator_token(rems: tuple[RemsService, TestClient, Clock]) -> None:
    service, client, _ = rems
    body = {"checks": [{"id": "kernel.text", "interval_s": 5}]}
    assert client.put("/v1/policies/lab", json=body).status_code == 401
    assert client.put("/v1/policies/lab", json=body,
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert service.store.get_policy("lab") is None  # nothing stored
    assert client.put("/v1/cvms/cvm1/policy", json={"policy": "lab"}).status_code == 401
    r = client.put("/v1/policies/lab", json=body, headers=AUTH)
    assert {k: r.json()[k] for k in ("name", "version", "changed")} == {
        "name": "lab", "version": 1, "changed": True}
    # Stored as validated, defaults explicit: what every later reader sees.
    assert r.json()["policy"]["stale_after_intervals"] == 3
    assert client.put("/v1/policies/lab", json=body, headers=AUTH).json()["changed"] is False


@pytest.mark.parametrize("body", [
    {"checks": [{"id": "Kernel Text"}]},
    {"checks": [{"id": "kernel.text", "interval_s": 0}]},
    {"checks": "all"},
    {"checks": [{"id": "behaviour.trace", "interval_s": 2}]},  # opt-in: needs its model
    {"checks": [{"id": "behaviour.trace", "params": {"model": ["a", "list"]}}]},
    {"checks": [{"id": "kernel.text", "params": {"bad key!": 1}}]},
    {"verdict": {"rules": [{"name": "r", "when": "[?", "category": "configuration",
                            "tier": "warning"}]}},
    # Values that broke a REM-S later (issue 20): each is refused when it is put.
    {"checks": [{"id": "kernel.text"}], "quote_every": 0},
    {"checks": [{"id": "kernel.text"}], "quote_every": "3"},
    {"checks": [{"id": "kernel.text"}], "heartbeat_s": -1},
    {"checks": [{"id": "kernel.text"}], "stale_after_intervals": "3"},
    {"checks": [{"id": "kernel.text"}], "stale_after_intervals": 1e308},
    {"checks": [{"id": "kernel.text", "interval_s": float("nan")}]},
    {"checks": [{"id": "kernel.text", "interval_s": float("inf")}]},
    {"checks": [{"id": "kernel.text"}], "verdict": "x"},
    {"checks": [{"id": "kernel.text"}], "surprise": 1},
    {"checks": [{"id": "kernel.text"}, {"id": "kernel.text", "interval_s": 1}]},
    {"checks": []},
])
def test_bad_policies_are_refused(rems: tuple[RemsService, TestClient, Clock],
                                  body: dict[str, Any]) -> None:
    service, client, _ = rems
    raw = json.dumps(body).encode()  # NaN and Infinity as Python's json writes them
    r = client.put("/v1/policies/bad", content=raw,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert "\n" not in r.json()["detail"]  # one line, whatever was wrong
    assert service.store.get_policy("bad") is None


def test_openapi_spec_is_served(rems: tuple[RemsService, TestClient, Clock]) -> None:
    _, client, _ = rems
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    for path in ("/v1/decision/{cvm}", "/v1/cvms", "/v1/cvms/{cvm}/reports",
                 "/v1/policies/{name}", "/v1/cvms/{cvm}/policy", "/.well-known/jwks.json"):
        assert path in spec["paths"], path
    assert client.get("/v1/decision/bad name!").status_code in (403, 404, 422)


def token(client: TestClient, scope: str, **extra: Any) -> dict[str, str]:
    r = client.post("/v1/tokens", headers=AUTH, json={"scope": scope, **extra})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def test_scoped_tokens(rems: tuple[RemsService, TestClient, Clock]) -> None:
    """Read tokens read; enrollment tokens enroll their A-VM and nothing else."""
    service, client, _ = rems
    body = {"checks": [{"id": "kernel.text", "interval_s": 5}]}
    assert client.put("/v1/policies/lab", json=body, headers=AUTH).status_code == 200
    read = token(client, "read", note="dashboard")
    assert client.get("/v1/policies/lab", headers=read).status_code == 200
    assert client.get("/v1/cvms", headers=read).status_code == 200
    assert client.put("/v1/policies/lab", json=body, headers=read).status_code == 403
    assert client.post("/v1/tokens", json={"scope": "operator"}, headers=read).status_code == 403
    enroll = token(client, "enroll", avm="avm1")
    for method, path, payload in [("PUT", "/v1/policies/x", body),
                                  ("GET", "/v1/policies/lab", None),
                                  ("GET", "/v1/cvms/cvm1/reports", None),
                                  ("PUT", "/v1/cvms/cvm1/avm", {"avm": "avm1"}),
                                  ("POST", "/v1/attest/cvm1", None)]:
        r = client.request(method, path, json=payload, headers=enroll)
        assert r.status_code == 403, (method, path, r.status_code)
    assert service.store.get_policy("x") is None
    assert service.store.binding_of("cvm1") is None
    # For another A-VM the enrollment token is refused before any TPM work.
    r = client.post("/v1/enroll", headers=enroll, json={
        "avm_id": "avm2", "ek_certificate_b64": "AA==", "ek_public_b64": "AA==",
        "ak_public_b64": "AA=="})
    assert r.status_code in (403, 503), r.text
    expired = token(client, "read", ttl_s=0.001)
    time.sleep(0.01)
    assert client.get("/v1/cvms", headers=expired).status_code == 401
    token_id = client.get("/v1/tokens", headers=AUTH).json()[0]["token_id"]
    assert client.delete(f"/v1/tokens/{token_id}", headers=AUTH).json()["changed"] is True
    assert client.get("/v1/cvms", headers=read).status_code == 401  # revoked


def test_decisions_and_the_status_page_only_for_the_named_addresses(
        rems: tuple[RemsService, TestClient, Clock]) -> None:
    service, _, _ = rems
    far = TestClient(create_app(service, TOKEN), client=("192.0.2.7", 40000))
    r = far.get("/v1/decision/cvm1")
    assert r.status_code == 403
    assert "may not ask" in r.text
    assert far.get("/").status_code == 401  # people elsewhere need a read token
    read = token(far, "read")
    assert far.get("/", headers=read).status_code == 200
    assert far.get("/.well-known/jwks.json").status_code == 200  # the public key is public


def test_a_cvm_moves_to_another_a_vm_only_explicitly(
        rems: tuple[RemsService, TestClient, Clock]) -> None:
    service, client, _ = rems
    assert client.put("/v1/cvms/cvm1/avm", headers=AUTH, json={"avm": "avm1"}).json()[
        "changed"] is True
    assert client.put("/v1/cvms/cvm1/avm", headers=AUTH, json={"avm": "avm1"}).json()[
        "changed"] is False
    service.ingest_report("avm1", "cvm1", 1, GENESIS, report())
    r = client.put("/v1/cvms/cvm1/avm", headers=AUTH, json={"avm": "avm2"})
    assert r.status_code == 409
    assert service.store.binding_of("cvm1") == "avm1"
    assert client.put("/v1/cvms/cvm1/avm", headers=AUTH,
                      json={"avm": "avm2", "move": True}).status_code == 200
    assert service.store.binding_of("cvm1") == "avm2"
    assert service.store.check_results("cvm1") == {}  # nothing avm1 said counts for avm2
    d = service.decision("cvm1")
    assert not d.allowed
    assert "avm2" in str(service.store.verdict("cvm1"))


def test_references_are_approved_per_kind(rems: tuple[RemsService, TestClient, Clock]) -> None:
    _, client, _ = rems
    digest = "ab" * 32
    r = client.put("/v1/cvms/cvm1/references/baseline", headers=AUTH, json={"digest": digest})
    assert r.json()["changed"] is True
    assert client.put("/v1/cvms/cvm1/references/agent-code", headers=AUTH,
                      json={"digest": digest}).status_code == 404  # an A-VM's kind
    assert client.put("/v1/avms/avm1/references/agent-code", headers=AUTH,
                      json={"digest": "not hex"}).status_code == 422
    assert client.get("/v1/cvms/cvm1", headers=AUTH).json()["references"] == {
        "baseline": digest}
    assert client.delete("/v1/cvms/cvm1/references/baseline", headers=AUTH).json()[
        "changed"] is True


@pytest.mark.parametrize("raw", [
    b'{"timeout_s": NaN}', b'{"timeout_s": Infinity}', b'{"timeout_s": 1e309}',
    b'{"timeout_s": -1}', b'{"nonce": "not base64url!"}', b'[1, 2]'])
def test_bad_attest_requests_are_4xx_not_500(rems: tuple[RemsService, TestClient, Clock],
                                             raw: bytes) -> None:
    _, client, _ = rems
    r = client.post("/v1/attest/cvm1", content=raw,
                    headers={**AUTH, "Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, (raw, r.status_code, r.text)


def test_strings_that_cannot_be_stored_are_refused(
        rems: tuple[RemsService, TestClient, Clock]) -> None:
    service, client, _ = rems
    lone = '{"checks": [{"id": "kernel.text"}], "verdict": {"rules": [{"name": "\\ud800", ' \
        '"when": "`true`", "category": "configuration", "tier": "warning"}]}}'
    r = client.put("/v1/policies/p", content=lone.encode(),
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert service.store.get_policy("p") is None
    r = client.post("/v1/tokens", content=b'{"scope": "read", "note": "\\udc00"}',
                    headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text


def test_bodies_are_bounded_and_need_a_token_first(
        rems: tuple[RemsService, TestClient, Clock]) -> None:
    service, client, _ = rems
    big = b"[" + b"1," * 300_000 + b"1]"
    r = client.put("/v1/policies/p", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413  # too long, by its Content-Length: not read at all
    r = client.put("/v1/policies/p", content=b"[1]",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 401  # no token: refused before the body is read
    r = client.put("/v1/policies/p", content=big, headers={**AUTH, "Content-Length": "5"})
    assert r.status_code in (400, 413, 422)
    assert service.store.get_policy("p") is None


def test_a_reason_quoting_the_guest_is_a_valid_header(
        rems: tuple[RemsService, TestClient, Clock]) -> None:
    """A finding's summary quotes guest memory (a process name, a path); the decision's
    X-VIMS-Reason header must still be sendable: one line of printable ASCII."""
    service, client, _ = rems
    assert client.put("/v1/policies/lab", headers=AUTH, json={
        "checks": [{"id": "kernel.syscall_table", "interval_s": 2}]}).status_code == 200
    assert client.put("/v1/cvms/cvm1/policy", headers=AUTH,
                      json={"policy": "lab"}).status_code == 200
    hostile = {"check": "kernel.syscall_table", "severity": "critical",
               "summary": "exec /tmp/\u2603\r\nX-Injected: yes\x00 not in the model"}
    service.ingest_report("avm1", "cvm1", 1, GENESIS, report([hostile]))
    r = client.get("/v1/decision/cvm1")
    assert r.status_code == 403
    reason = r.headers["x-vims-reason"]
    assert "x-injected" not in {k.lower() for k in r.headers}
    assert all(" " <= c <= "~" for c in reason), reason
    assert "not in the model" in reason


@pytest.mark.parametrize("reason", [
    "x" * 511 + " tail",  # cut at 512 right after a space
    " leading and trailing ",
    "newline\nand \u00e9 and \u2603",
])
def test_a_decision_reason_is_always_a_header_h11_can_send(reason: str) -> None:
    import h11

    from vims.rems.api import header_safe

    value = header_safe(reason)
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    conn.send(h11.Response(status_code=200, headers=[("X-VIMS-Reason", value),
                                                     ("Content-Length", "0")]))
    assert len(value) <= 512
