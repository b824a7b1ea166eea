"""The REM-S HTTP API (FastAPI; the OpenAPI spec is served at /openapi.json).

``GET /v1/decision/{cvm}`` answers 200 (body: the EAR) or 403, so nginx's
``auth_request`` can use it as it is. Reads are open to the gate; writes
(policies, assignments) need the operator's bearer token.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import html
import re
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import jwt
from fastapi import Body, Depends, FastAPI, Header, HTTPException, Path, Query
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vims import __version__
from vims.protocol.messages import OPT_IN_CHECKS, CheckSpec
from vims.rems import ear
from vims.rems.enroll import Enroller, EnrollmentError
from vims.rems.service import RemsService
from vims.rems.verdict import PolicyError, VerdictPolicy

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
CHECK_ID = re.compile(r"^[a-z]+\.[a-z_]+$")
MAX_POLICY_CHECKS = 64

CvmName = Annotated[str, Path(pattern=NAME, description="C-VM name")]


class AttestFailed(Exception):
    """An on-demand round could not be had; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AttestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timeout_s: float = Field(default=30.0, gt=0, le=600)


B64 = r"^[A-Za-z0-9+/=]+$"


class EnrollRequest(BaseModel):
    """An A-VM's vTPM: EK certificate (DER), EK and AK TPM2B_PUBLIC, optional CSR."""

    model_config = ConfigDict(extra="forbid")
    avm_id: str = Field(pattern=NAME)
    ek_certificate_b64: str = Field(pattern=B64, max_length=16384)
    ek_public_b64: str = Field(pattern=B64, max_length=4096)
    ak_public_b64: str = Field(pattern=B64, max_length=4096)
    csr_pem: str | None = Field(default=None, max_length=8192)


class ActivateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    secret_b64: str = Field(pattern=B64, max_length=128)


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HTTPException(422, f"{what}: not valid base64") from exc


Attester = Callable[[str, float], Awaitable[Any]]
"""``attest(cvm, timeout_s)``: run a fresh round; its result is the verified report event."""


def validate_policy(body: dict[str, Any]) -> None:
    """A policy: checks with frequencies, and verdict rules (JMESPath)."""
    checks = body.get("checks", [])
    if not isinstance(checks, list) or len(checks) > MAX_POLICY_CHECKS:
        raise PolicyError(f"checks must be a list of at most {MAX_POLICY_CHECKS}")
    for c in checks:
        if not isinstance(c, dict) or not CHECK_ID.match(str(c.get("id", ""))):
            raise PolicyError("each check needs an id like kernel.text")
        interval = c.get("interval_s", 10)
        if not isinstance(interval, (int, float)) or not 0.1 <= interval <= 86400:
            raise PolicyError(f"{c['id']}: interval_s must be within 0.1..86400")
        try:  # what the A-VM will be sent: refuse here what the channel would refuse
            CheckSpec(id=c["id"], interval_s=interval, params=c.get("params", {}))
        except ValidationError as exc:
            err = exc.errors()[0]
            raise PolicyError(f"{c['id']}: {'.'.join(str(p) for p in err['loc'])}: "
                              f"{err['msg']}") from exc
        if c["id"] in OPT_IN_CHECKS and not c.get("params"):
            raise PolicyError(f"{c['id']} needs params ({OPT_IN_CHECKS[c['id']]})")
    VerdictPolicy.from_dict({"name": body.get("name", "policy"), **body.get("verdict", {})})


def create_app(service: RemsService, admin_token: str,
               attest: Attester | None = None, enroller: Enroller | None = None,
               policies_changed: Callable[[], None] = lambda: None) -> FastAPI:
    """The API over *service*; ``policies_changed`` is called after a policy or an
    assignment changed, so the REM-S can push the new policy to connected A-VMs."""
    app = FastAPI(title="VIMS REM-S", version=__version__,
                  description="Verdicts on C-VMs from A-VM introspection reports.")

    def require_admin(authorization: Annotated[str | None, Header()] = None) -> None:
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not given or not hmac.compare_digest(given.encode(), admin_token.encode()):
            raise HTTPException(401, "authentication required",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/v1/decision/{cvm}", responses={403: {"description": "untrusted, stale or unknown"}})
    def decision(cvm: CvmName) -> PlainTextResponse:
        """200 with the EAR when the C-VM may pass the gate, else 403."""
        d = service.decision(cvm)
        headers = {"X-VIMS-Status": d.status, "X-VIMS-Reason": d.reason,
                   "Cache-Control": "no-store"}
        if d.allowed and d.ear:
            return PlainTextResponse(d.ear, headers=headers, media_type="application/jwt")
        return PlainTextResponse(d.reason, status_code=403, headers=headers)

    @app.post("/v1/attest/{cvm}", dependencies=[Depends(require_admin)],
              responses={404: {"description": "unknown C-VM"},
                         503: {"description": "no A-VM connected for it"},
                         504: {"description": "no fresh report in time"}})
    async def attest_now(cvm: CvmName,
                         body: Annotated[AttestRequest | None, Body()] = None) -> dict[str, Any]:
        """Attest on demand: a fresh round (new nonce, full report, quote), then the verdict."""
        if attest is None:
            raise HTTPException(503, "this REM-S has no control channel")
        try:
            answer = await attest(cvm, (body or AttestRequest()).timeout_s)
        except AttestFailed as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        d = service.decision(cvm)
        v = service.store.verdict(cvm) or {}
        try:
            claims = ear.verify(d.ear, service.key.public_key()) if d.ear else {}
        except jwt.InvalidTokenError:  # lapsed since: the status already says stale
            claims = {}
        return {"cvm": cvm, "trusted": d.allowed, "status": d.status, "reason": d.reason,
                "vector": v.get("vector", {}), "ear": d.ear, "claims": claims,
                "report": {"seq": answer.seq, "digest": answer.digest,
                           "result": answer.body.get("result", "error"),
                           "findings": answer.body.get("findings", [])}}

    @app.post("/v1/enroll", dependencies=[Depends(require_admin)],
              responses={403: {"description": "EK or CSR refused"}})
    def enroll_start(body: EnrollRequest) -> dict[str, Any]:
        """Enrollment, step 1: EK chain checked, AK bound to it by MakeCredential."""
        if enroller is None:
            raise HTTPException(503, "enrollment is not configured on this REM-S")
        try:
            challenge = enroller.challenge(
                body.avm_id, _b64(body.ek_certificate_b64, "ek_certificate_b64"),
                _b64(body.ek_public_b64, "ek_public_b64"),
                _b64(body.ak_public_b64, "ak_public_b64"),
                body.csr_pem.encode() if body.csr_pem else None)
        except EnrollmentError as exc:
            raise HTTPException(403, str(exc)) from exc
        return {"session": challenge.session,
                "credential_blob_b64": base64.b64encode(challenge.credential_blob).decode(),
                "encrypted_secret_b64": base64.b64encode(challenge.encrypted_secret).decode()}

    @app.post("/v1/enroll/{session}/activate", dependencies=[Depends(require_admin)],
              responses={403: {"description": "wrong secret, unknown or expired session"}})
    def enroll_finish(session: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")],
                      body: ActivateRequest) -> dict[str, Any]:
        """Enrollment, step 2: the TPM's ActivateCredential answer; the AK is stored."""
        if enroller is None:
            raise HTTPException(503, "enrollment is not configured on this REM-S")
        try:
            done = enroller.complete(session, _b64(body.secret_b64, "secret_b64"))
        except EnrollmentError as exc:
            raise HTTPException(403, str(exc)) from exc
        ca_pem = enroller.ca.cert_pem.decode() if enroller.ca else None
        return {"avm_id": done.avm_id, "changed": done.changed, "ak_sha256": done.ak_sha256,
                "certificate_pem": done.certificate_pem, "ca_pem": ca_pem}

    @app.get("/v1/cvms")
    def cvms() -> list[dict[str, Any]]:
        out = []
        for name in service.store.cvms():
            v = service.store.verdict(name)
            d = service.decision(name)
            out.append({"cvm": name, "allowed": d.allowed, "reason": d.reason,
                        "status": v["status"] if v else "none",
                        "vector": v["vector"] if v else {},
                        "expires_at": v["expires_at"] if v else None,
                        "policy": service.store.policy_of(name)})
        return out

    @app.get("/v1/cvms/{cvm}/reports")
    def reports(cvm: CvmName,
                limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[dict[str, Any]]:
        return service.store.reports(cvm, limit)

    @app.put("/v1/policies/{name}", dependencies=[Depends(require_admin)])
    def put_policy(name: Annotated[str, Path(pattern=NAME)],
                   body: dict[str, Any]) -> dict[str, Any]:
        try:
            validate_policy(body)
        except PolicyError as exc:
            raise HTTPException(422, str(exc)) from exc
        changed, version = service.store.put_policy(name, {**body, "name": name})
        if changed:
            policies_changed()
        return {"name": name, "version": version, "changed": changed}

    @app.get("/v1/policies/{name}")
    def get_policy(name: Annotated[str, Path(pattern=NAME)]) -> dict[str, Any]:
        found = service.store.get_policy(name)
        if found is None:
            raise HTTPException(404, f"no policy {name}")
        return {"name": name, "version": found[0], "policy": found[1]}

    @app.put("/v1/cvms/{cvm}/policy", dependencies=[Depends(require_admin)])
    def assign(cvm: CvmName, body: dict[str, str]) -> dict[str, Any]:
        policy = body.get("policy", "")
        if service.store.get_policy(policy) is None:
            raise HTTPException(404, f"no policy {policy!r}")
        changed = service.store.assign(cvm, policy)
        if changed:
            policies_changed()
        return {"cvm": cvm, "policy": policy, "changed": changed}

    @app.get("/.well-known/jwks.json")
    def jwks() -> JSONResponse:
        """The key relying parties verify EARs with."""
        return JSONResponse(ear.jwks(service.key.public_key()))

    @app.get("/", response_class=HTMLResponse)
    def status_page() -> str:
        """C-VMs with their verdict, trust vector and recent results, for people."""
        rows = []
        for item in cvms():
            timeline = "".join(
                f'<span class="{html.escape(r["result"])}" title="#{r["seq"]}"></span>'
                for r in reversed(service.store.reports(item["cvm"], 30)))
            vector = ", ".join(f"{k} {v}" for k, v in item["vector"].items() if v)
            rows.append(
                f"<tr><td>{html.escape(item['cvm'])}</td>"
                f"<td class=\"{'ok' if item['allowed'] else 'deny'}\">"
                f"{'allowed' if item['allowed'] else 'denied'}</td>"
                f"<td>{html.escape(item['status'])}</td><td>{html.escape(vector)}</td>"
                f"<td>{html.escape(item['reason'])}</td><td class=\"tl\">{timeline}</td></tr>")
        return STATUS_PAGE.format(rows="".join(rows) or '<tr><td colspan="6">no C-VMs yet'
                                  "</td></tr>", now=time.strftime("%Y-%m-%d %H:%M:%S"),
                                  version=__version__)

    return app


STATUS_PAGE = """<!doctype html><html><head><meta charset="utf-8">
<meta http-equiv="refresh" content="5"><title>VIMS REM-S</title><style>
body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
.ok{{color:#060;font-weight:bold}} .deny{{color:#a00;font-weight:bold}}
.tl span{{display:inline-block;width:8px;height:14px;margin-right:1px}}
.tl .pass{{background:#3a3}} .tl .fail{{background:#c33}} .tl .error{{background:#e90}}
</style></head><body><h1>VIMS REM-S</h1><p>{now} · vims {version}</p>
<table><tr><th>C-VM</th><th>gate</th><th>status</th><th>trust vector</th><th>reason</th>
<th>recent reports</th></tr>{rows}</table></body></html>"""
