"""The REM-S HTTP API (FastAPI; the OpenAPI spec is served at /openapi.json).

``GET /v1/decision/{cvm}`` answers 200 (body: the EAR) or 403, so nginx's
``auth_request`` can use it as it is; it needs no token but answers only the
addresses the operator names (``decision_allow``). Everything else needs a
bearer token of the right scope:

- ``operator``: every write (policies, assignments, bindings, references,
  tokens, on-demand attestation) and every read; the bootstrap operator token
  is the REM-S's ``admin_token_file``, more are made with ``POST /v1/tokens``;
- ``read``: reports, policies, verdicts, bindings, references, the status page;
- ``enroll``: single-use, made for one A-VM: that A-VM's enrollment, nothing else.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import html
import ipaddress
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import jwt
from fastapi import Body, Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from vims import __version__
from vims.rems import ear
from vims.rems.config import LOOPBACK, Network, RemsConfig
from vims.rems.enroll import Enroller, EnrollmentError
from vims.rems.evidence import AVM_KINDS, CVM_KINDS
from vims.rems.httpguard import BodyGuard
from vims.rems.policy import parse_policy
from vims.rems.service import RemsService
from vims.rems.store import BindingConflict, StoreError, Token
from vims.rems.verdict import PolicyError

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SHA256 = r"^[0-9a-f]{64}$"

CvmName = Annotated[str, Path(pattern=NAME, description="C-VM name")]
AvmName = Annotated[str, Path(pattern=NAME, description="A-VM name")]
Kind = Annotated[str, Path(pattern=r"^[a-z-]{1,32}$", description="reference kind")]


class AttestFailed(Exception):
    """An on-demand round could not be had; ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        # JSON may carry lone surrogates; stored or logged they would fail later (a 500).
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                raise ValueError("not valid Unicode (a lone surrogate)") from None
        return value


class AttestRequest(_Body):
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    # The relying party's nonce: the answer's EAR carries it as eat_nonce.
    nonce: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{11,86}$")


B64 = r"^[A-Za-z0-9+/=]+$"


class EnrollRequest(_Body):
    """An A-VM's vTPM: EK certificate (DER), EK and AK TPM2B_PUBLIC, optional CSR."""

    avm_id: str = Field(pattern=NAME)
    ek_certificate_b64: str = Field(pattern=B64, max_length=16384)
    ek_public_b64: str = Field(pattern=B64, max_length=4096)
    ak_public_b64: str = Field(pattern=B64, max_length=4096)
    csr_pem: str | None = Field(default=None, max_length=8192)


class ActivateRequest(_Body):
    secret_b64: str = Field(pattern=B64, max_length=128)


class AssignRequest(_Body):
    policy: str = Field(pattern=NAME)


class BindRequest(_Body):
    avm: str = Field(pattern=NAME)
    move: bool = False  # a C-VM bound to another A-VM moves only when this says so


class ReferenceRequest(_Body):
    digest: str = Field(pattern=SHA256)


class TokenRequest(_Body):
    scope: Literal["operator", "read", "enroll"]
    avm: str | None = Field(default=None, pattern=NAME)
    ttl_s: float | None = Field(default=None, gt=0, le=366 * 86400)
    note: str = Field(default="", max_length=128)


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HTTPException(422, f"{what}: not valid base64") from exc


Attester = Callable[[str, float], Awaitable[Any]]
"""``attest(cvm, timeout_s)``: run a fresh round; its result is the verified report event."""


@dataclass(frozen=True)
class ApiSettings:
    """What the API needs of the REM-S configuration."""

    admin_token: str
    decision_allow: Sequence[Network] | None = field(default_factory=lambda: list(LOOPBACK))
    status_allow: Sequence[Network] | None = field(default_factory=lambda: list(LOOPBACK))

    @classmethod
    def from_config(cls, config: RemsConfig) -> ApiSettings:
        return cls(config.admin_token(), config.decision_allow, config.status_allow)


def header_safe(text: str, limit: int = 512) -> str:
    """*text* as an HTTP header value: printable ASCII on one line.

    Reasons quote findings, and findings quote the guest (a process name, a path):
    a newline or a non-Latin-1 character there made the response unsendable, and
    the gate saw its connection closed without an answer. h11 also refuses a value
    that starts or ends with a space, which a cut at *limit* can leave.
    """
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit]).strip()


def _allowed(request: Request, networks: Sequence[Network] | None) -> bool:
    """Is the client's address in *networks* (None: any address)?"""
    if networks is None:
        return True
    host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in net for net in networks)


@dataclass(frozen=True)
class Principal:
    """Who a request authenticated as."""

    scope: str
    avm_id: str | None = None  # enrollment tokens: the one A-VM they enroll
    token_id: str | None = None


def validate_policy(body: dict[str, Any]) -> None:
    """A policy: checks with frequencies, and verdict rules (JMESPath); see rems/policy.py."""
    parse_policy(body)


def create_app(service: RemsService, settings: ApiSettings | RemsConfig | str,
               attest: Attester | None = None, enroller: Enroller | None = None,
               policies_changed: Callable[[], None] = lambda: None,
               bindings_changed: Callable[[], None] = lambda: None,
               references_changed: Callable[[str, str], None] = lambda scope, subject: None,
               ) -> FastAPI:
    """The API over *service*; ``policies_changed`` / ``bindings_changed`` /
    ``references_changed(scope, subject)`` are called after such a change, so the REM-S
    can push policies and close the channels that no longer hold."""
    if isinstance(settings, str):
        settings = ApiSettings(settings)
    elif isinstance(settings, RemsConfig):
        settings = ApiSettings.from_config(settings)
    cfg = settings
    store = service.store
    app = FastAPI(title="VIMS REM-S", version=__version__,
                  description="Verdicts on C-VMs from A-VM introspection reports.")

    @app.exception_handler(RequestValidationError)
    async def one_line(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 with one line; never the offending input (NaN would not even serialize)."""
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        return JSONResponse({"detail": f"{where}: {msg}"[:300]}, status_code=422)

    def principal_of(authorization: str | None) -> Principal | None:
        """Who a bearer token is (any scope), or None for no, a wrong or a spent token."""
        given = (authorization or "").removeprefix("Bearer ").strip()
        if given and hmac.compare_digest(given.encode(), cfg.admin_token.encode()):
            return Principal("operator")
        token: Token | None = store.token(given) if given else None
        if token is not None and (token.expires_at is None or token.expires_at > time.time()) \
                and not (token.scope == "enroll" and token.used_at is not None):
            return Principal(token.scope, token.avm_id, token.token_id)
        return None

    def principal(authorization: Annotated[str | None, Header()] = None) -> Principal:
        who = principal_of(authorization)
        if who is None:
            raise HTTPException(401, "authentication required",
                                headers={"WWW-Authenticate": "Bearer"})
        return who

    def require(*scopes: str) -> Callable[..., Principal]:
        def check(who: Principal = Depends(principal)) -> Principal:  # noqa: B008
            if who.scope not in scopes:
                raise HTTPException(403, f"a {who.scope} token cannot do this")
            return who
        return check

    operator = Depends(require("operator"))
    reader = Depends(require("operator", "read"))
    enrolling = Depends(require("operator", "enroll"))

    def _decision_headers(d: Any) -> dict[str, str]:
        headers = {"X-VIMS-Status": d.status, "X-VIMS-Reason": header_safe(d.reason),
                   "Cache-Control": "no-store"}
        if d.insecure_lab:
            headers["X-VIMS-Insecure-Lab"] = "true"
        return headers

    @app.get("/v1/decision/{cvm}", responses={403: {"description": "untrusted, stale or unknown"}})
    def decision(cvm: CvmName, request: Request) -> PlainTextResponse:
        """200 with the EAR when the C-VM may pass the gate, else 403."""
        if not _allowed(request, cfg.decision_allow):
            return PlainTextResponse("this address may not ask for decisions", status_code=403,
                                     headers={"Cache-Control": "no-store"})
        d = service.decision(cvm)
        if d.allowed and d.ear:
            return PlainTextResponse(d.ear, headers=_decision_headers(d),
                                     media_type="application/jwt")
        return PlainTextResponse(d.reason, status_code=403, headers=_decision_headers(d))

    def _claims(token: str | None, nonce: str | None = None) -> dict[str, Any]:
        try:
            return ear.verify(token, service.key.public_key(), nonce=nonce) if token else {}
        except jwt.InvalidTokenError:  # lapsed since: the status already says stale
            return {}

    @app.post("/v1/attest/{cvm}", dependencies=[operator],
              responses={404: {"description": "unknown C-VM"},
                         503: {"description": "no A-VM connected for it"},
                         504: {"description": "no fresh report in time"}})
    async def attest_now(cvm: CvmName,
                         body: Annotated[AttestRequest | None, Body()] = None) -> dict[str, Any]:
        """Attest on demand: a fresh round (new nonce, full report, quote), then the verdict."""
        if attest is None:
            raise HTTPException(503, "this REM-S has no control channel")
        req = body or AttestRequest()
        try:
            answer = await attest(cvm, req.timeout_s)
        except AttestFailed as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        d = service.decision(cvm, nonce=req.nonce)
        v = d.verdict
        return {"cvm": cvm, "trusted": d.allowed, "status": d.status, "reason": d.reason,
                "vector": v.vector if v else {}, "checks": d.checks, "ear": d.ear,
                "claims": _claims(d.ear, req.nonce), "insecure_lab": d.insecure_lab,
                "report": {"seq": answer.seq, "digest": answer.digest,
                           "result": answer.body.get("result", "error"),
                           "findings": answer.body.get("findings", [])}}

    # ------------------------------------------------------------ enrollment
    @app.post("/v1/enroll", responses={403: {"description": "EK, AK or CSR refused"}})
    def enroll_start(body: EnrollRequest, who: Principal = enrolling) -> dict[str, Any]:
        """Enrollment, step 1: EK chain checked, AK bound to it by MakeCredential."""
        if enroller is None:
            raise HTTPException(503, "enrollment is not configured on this REM-S")
        if who.scope == "enroll" and who.avm_id != body.avm_id:
            raise HTTPException(403, "this enrollment token is for another A-VM")
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

    @app.post("/v1/enroll/{session}/activate",
              responses={403: {"description": "wrong secret, unknown or expired session"}})
    def enroll_finish(session: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")],
                      body: ActivateRequest, who: Principal = enrolling) -> dict[str, Any]:
        """Enrollment, step 2: the TPM's ActivateCredential answer; the AK is stored."""
        if enroller is None:
            raise HTTPException(503, "enrollment is not configured on this REM-S")
        pending = enroller.pending_avm(session)
        if who.scope == "enroll" and pending is not None and pending != who.avm_id:
            raise HTTPException(403, "this enrollment token is for another A-VM")
        if who.scope == "enroll" and pending is not None and who.token_id \
                and not store.use_token(who.token_id):
            raise HTTPException(401, "this enrollment token was used already")
        try:
            done = enroller.complete(session, _b64(body.secret_b64, "secret_b64"))
        except EnrollmentError as exc:
            raise HTTPException(403, str(exc)) from exc
        ca_pem = enroller.ca.cert_pem.decode() if enroller.ca else None
        return {"avm_id": done.avm_id, "changed": done.changed, "ak_sha256": done.ak_sha256,
                "certificate_pem": done.certificate_pem, "ca_pem": ca_pem}

    # ------------------------------------------------------------- C-VMs
    def _cvm_summary(name: str) -> dict[str, Any]:
        d = service.decision(name)
        v = d.verdict
        return {"cvm": name, "allowed": d.allowed, "reason": d.reason, "status": d.status,
                "vector": v.vector if v else {}, "checks": d.checks,
                "expires_at": v.expires_at if v else None, "policy": store.policy_of(name),
                "avm": store.binding_of(name), "insecure_lab": d.insecure_lab}

    @app.get("/v1/cvms", dependencies=[reader])
    def cvms() -> list[dict[str, Any]]:
        return [_cvm_summary(name) for name in store.cvms()]

    @app.get("/v1/cvms/{cvm}", dependencies=[reader])
    def cvm_detail(cvm: CvmName) -> dict[str, Any]:
        """The C-VM's decision, trust vector and per-check status now, with the reasons."""
        summary = _cvm_summary(cvm)
        v = service.verdict(cvm)
        summary["reasons"] = v.reasons if v else []
        summary["references"] = {k: d for (_, _, k), d in
                                 store.references("cvm", cvm).items()}
        return summary

    @app.get("/v1/cvms/{cvm}/reports", dependencies=[reader])
    def reports(cvm: CvmName,
                limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[dict[str, Any]]:
        return store.reports(cvm, limit)

    @app.put("/v1/cvms/{cvm}/policy", dependencies=[operator])
    def assign(cvm: CvmName, body: AssignRequest) -> dict[str, Any]:
        if store.get_policy(body.policy) is None:
            raise HTTPException(404, f"no policy {body.policy!r}")
        changed = store.assign(cvm, body.policy)
        if changed:
            policies_changed()
        return {"cvm": cvm, "policy": body.policy, "changed": changed}

    @app.put("/v1/cvms/{cvm}/avm", dependencies=[operator],
             responses={409: {"description": "bound to another A-VM (move it with move: true)"}})
    def bind(cvm: CvmName, body: BindRequest) -> dict[str, Any]:
        """Let one A-VM (alone) report on the C-VM; moving it is explicit (``move``)."""
        try:
            changed = store.bind(cvm, body.avm, body.move)
        except BindingConflict as exc:
            raise HTTPException(409, str(exc)) from exc
        if changed:
            bindings_changed()
        return {"cvm": cvm, "avm": body.avm, "changed": changed}

    @app.delete("/v1/cvms/{cvm}/avm", dependencies=[operator])
    def unbind(cvm: CvmName) -> dict[str, Any]:
        changed = store.unbind(cvm)
        if changed:
            bindings_changed()
        return {"cvm": cvm, "changed": changed}

    # -------------------------------------------------------- references
    def _set_reference(scope: str, subject: str, kind: str, digest: str | None
                       ) -> dict[str, Any]:
        kinds = AVM_KINDS if scope == "avm" else CVM_KINDS
        if kind not in kinds:
            raise HTTPException(404, f"no reference kind {kind!r} for an {scope.upper()} "
                                     f"(one of {', '.join(kinds)})")
        changed = store.set_reference(scope, subject, kind, digest)
        if changed:
            references_changed(scope, subject)
        return {scope: subject, "kind": kind, "digest": digest, "changed": changed}

    @app.put("/v1/cvms/{cvm}/references/{kind}", dependencies=[operator])
    def cvm_reference(cvm: CvmName, kind: Kind, body: ReferenceRequest) -> dict[str, Any]:
        """Approve the digest of a C-VM's profile, baseline or local policy (PCR 23)."""
        return _set_reference("cvm", cvm, kind, body.digest)

    @app.delete("/v1/cvms/{cvm}/references/{kind}", dependencies=[operator])
    def cvm_reference_gone(cvm: CvmName, kind: Kind) -> dict[str, Any]:
        return _set_reference("cvm", cvm, kind, None)

    @app.put("/v1/avms/{avm}/references/{kind}", dependencies=[operator])
    def avm_reference(avm: AvmName, kind: Kind, body: ReferenceRequest) -> dict[str, Any]:
        """Approve the digest of an A-VM's agent code or configuration (PCR 23)."""
        return _set_reference("avm", avm, kind, body.digest)

    @app.delete("/v1/avms/{avm}/references/{kind}", dependencies=[operator])
    def avm_reference_gone(avm: AvmName, kind: Kind) -> dict[str, Any]:
        return _set_reference("avm", avm, kind, None)

    @app.get("/v1/avms/{avm}", dependencies=[reader])
    def avm_detail(avm: AvmName) -> dict[str, Any]:
        """The A-VM: enrolled or not, the C-VMs bound to it, its approved digests."""
        return {"avm": avm, "enrolled": store.ak_of(avm) is not None,
                "cvms": sorted(c for c, a in store.bindings().items() if a == avm),
                "references": {k: d for (_, _, k), d in store.references("avm", avm).items()}}

    # ------------------------------------------------------------- tokens
    @app.post("/v1/tokens", dependencies=[operator])
    def token_create(body: TokenRequest) -> dict[str, Any]:
        """A new credential; its secret is in this answer only."""
        try:
            token, secret = store.create_token(body.scope, body.avm, body.note, body.ttl_s)
        except StoreError as exc:
            raise HTTPException(422, str(exc)) from exc
        return {"token": secret, "token_id": token.token_id, "scope": token.scope,
                "avm": token.avm_id, "expires_at": token.expires_at}

    @app.get("/v1/tokens", dependencies=[operator])
    def token_list() -> list[dict[str, Any]]:
        return [{"token_id": t.token_id, "scope": t.scope, "avm": t.avm_id, "note": t.note,
                 "created_at": t.created_at, "expires_at": t.expires_at, "used_at": t.used_at}
                for t in store.tokens()]

    @app.delete("/v1/tokens/{token_id}", dependencies=[operator])
    def token_revoke(token_id: Annotated[str, Path(pattern=r"^[0-9a-f]{16}$")]
                     ) -> dict[str, Any]:
        return {"token_id": token_id, "changed": store.revoke_token(token_id)}

    # ------------------------------------------------------------ policies
    @app.put("/v1/policies/{name}", dependencies=[operator])
    def put_policy(name: Annotated[str, Path(pattern=NAME)], body: Annotated[Any, Body()],
                   dry_run: bool = False) -> dict[str, Any]:
        """Store a policy (validated, defaults made explicit); ``dry_run``: only say
        whether it would change, and how the REM-S would store it (check mode)."""
        try:
            doc = parse_policy(body, name)
        except PolicyError as exc:
            raise HTTPException(422, str(exc)) from exc
        stored = store.get_policy(name)
        if dry_run:
            changed = stored is None or stored[1] != doc.body()
            version = None if stored is None else stored[0]
        else:
            changed, version = store.put_policy(name, doc.body())
            if changed:
                policies_changed()
        return {"name": name, "version": version, "changed": changed, "policy": doc.body()}

    @app.get("/v1/policies/{name}", dependencies=[reader])
    def get_policy(name: Annotated[str, Path(pattern=NAME)]) -> dict[str, Any]:
        found = store.get_policy(name)
        if found is None:
            raise HTTPException(404, f"no policy {name}")
        return {"name": name, "version": found[0], "policy": found[1]}

    @app.get("/.well-known/jwks.json")
    def jwks() -> JSONResponse:
        """The key relying parties verify EARs (and webhooks) with."""
        return JSONResponse(ear.jwks(service.key.public_key()))

    @app.get("/", response_class=HTMLResponse)
    def status_page(request: Request,
                    authorization: Annotated[str | None, Header()] = None) -> str:
        """C-VMs with their verdict, per-check status and recent results, for people."""
        if not _allowed(request, cfg.status_allow):
            who = principal(authorization)
            if who.scope not in ("operator", "read"):
                raise HTTPException(403, f"a {who.scope} token cannot do this")
        rows = []
        for item in cvms():
            timeline = "".join(
                f'<span class="{html.escape(r["result"])}" title="#{r["seq"]}"></span>'
                for r in reversed(store.reports(item["cvm"], 30)))
            vector = ", ".join(f"{k} {v}" for k, v in item["vector"].items() if v)
            checks = " ".join(f'<span class="c-{html.escape(st)}">{html.escape(cid)}</span>'
                              for cid, st in sorted(item["checks"].items()))
            rows.append(
                f"<tr><td>{html.escape(item['cvm'])}</td>"
                f"<td>{html.escape(item['avm'] or '-')}</td>"
                f"<td class=\"{'ok' if item['allowed'] else 'deny'}\">"
                f"{'allowed' if item['allowed'] else 'denied'}</td>"
                f"<td>{html.escape(item['status'])}</td><td>{html.escape(vector)}</td>"
                f"<td class=\"checks\">{checks}</td>"
                f"<td>{html.escape(item['reason'])}</td><td class=\"tl\">{timeline}</td></tr>")
        banner = ('<p class="deny">insecure_lab: A-VMs are trusted without golden launch '
                  "values and reference digests</p>" if service.insecure_lab else "")
        return STATUS_PAGE.format(rows="".join(rows) or '<tr><td colspan="8">no C-VMs yet'
                                  "</td></tr>", now=time.strftime("%Y-%m-%d %H:%M:%S"),
                                  version=__version__, banner=banner)

    # Outermost: a body is read only after its token checked out, and only so far.
    app.add_middleware(BodyGuard, authenticated=lambda h: principal_of(h) is not None)
    return app


STATUS_PAGE = """<!doctype html><html><head><meta charset="utf-8">
<meta http-equiv="refresh" content="5"><title>VIMS REM-S</title><style>
body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
.ok{{color:#060;font-weight:bold}} .deny{{color:#a00;font-weight:bold}}
.tl span{{display:inline-block;width:8px;height:14px;margin-right:1px}}
.tl .pass{{background:#3a3}} .tl .fail{{background:#c33}} .tl .error{{background:#e90}}
.checks span{{margin-right:4px;font-size:85%}} .c-pass{{color:#060}} .c-fail{{color:#a00}}
.c-stale,.c-error{{color:#b60}} .c-not_applicable{{color:#888}}
</style></head><body><h1>VIMS REM-S</h1><p>{now} · vims {version}</p>{banner}
<table><tr><th>C-VM</th><th>A-VM</th><th>gate</th><th>status</th><th>trust vector</th>
<th>checks</th><th>reason</th><th>recent reports</th></tr>{rows}</table></body></html>"""
