"""REM-S decisions and HTTP API: fail closed, EAR on 200, authenticated writes."""

from __future__ import annotations

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
    return service, TestClient(create_app(service, TOKEN)), clock


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
    assert claims["submods"]["cvm1"]["ear.status"] == "affirming"
    assert claims["submods"]["cvm1"]["ear.appraisal-policy-id"] == "policy:lab@1"
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

    listed = client.get("/v1/cvms").json()
    assert listed[0]["cvm"] == "cvm1"
    assert listed[0]["allowed"] is False
    assert [r["seq"] for r in client.get("/v1/cvms/cvm1/reports?limit=2").json()] == [3, 2]
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
    assert r.json() == {"name": "lab", "version": 1, "changed": True}
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
])
def test_bad_policies_are_refused(rems: tuple[RemsService, TestClient, Clock],
                                  body: dict[str, Any]) -> None:
    service, client, _ = rems
    assert client.put("/v1/policies/bad", json=body, headers=AUTH).status_code == 422
    assert service.store.get_policy("bad") is None


def test_openapi_spec_is_served(rems: tuple[RemsService, TestClient, Clock]) -> None:
    _, client, _ = rems
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    for path in ("/v1/decision/{cvm}", "/v1/cvms", "/v1/cvms/{cvm}/reports",
                 "/v1/policies/{name}", "/v1/cvms/{cvm}/policy", "/.well-known/jwks.json"):
        assert path in spec["paths"], path
    assert client.get("/v1/decision/bad name!").status_code in (403, 404, 422)
