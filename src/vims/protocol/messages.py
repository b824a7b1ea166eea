"""Typed messages of the VIMS control channel (A-VM <-> REM-S).

Every frame carries one JSON object with a ``type`` (the message kind) and the
protocol ``version``. The peer on the other side is untrusted until its vTPM
evidence verified, and even then a compromised A-VM must not be able to exhaust
the REM-S, so every model forbids unknown fields and bounds every string, list
and blob. Validation happens once, at the edge (:func:`decode_message`); the
state machines only ever see well-formed models.

Canonical encoding (used on the wire and for every hash): JSON with keys sorted,
no insignificant whitespace (``,`` and ``:`` separators), UTF-8 without ``\\u``
escaping of non-ASCII characters, NaN/Infinity forbidden, absent optional
fields omitted (never ``null``). See docs/protocol.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "MAX_B64_ATTEST",
    "MAX_B64_SIGNATURE",
    "MAX_EVENT_LOG",
    "MAX_REPORT_BODY",
    "NONCE_BYTES",
    "PROTOCOL_VERSION",
    "ZERO_HASH",
    "Bye",
    "Capabilities",
    "ChainHead",
    "Challenge",
    "CheckSpec",
    "ErrorMessage",
    "EventLogEntry",
    "Evidence",
    "Heartbeat",
    "Hello",
    "Message",
    "MessageDecodeError",
    "Policy",
    "PolicyAck",
    "PolicySpec",
    "PolicyUpdate",
    "Quote",
    "Report",
    "ReportAck",
    "ReportBody",
    "RoundRequest",
    "canonical_json",
    "decode_message",
    "encode_message",
    "policy_digest",
    "quote_qualifying_data",
    "report_digest",
]

PROTOCOL_VERSION = 1
NONCE_BYTES = 32
ZERO_HASH = "0" * 64
MAX_REPORT_BODY = 1024 * 1024
MAX_B64_ATTEST = 8192
MAX_B64_SIGNATURE = 2048
MAX_EVENT_LOG = 4096
MAX_CVMS = 256
MAX_POLICY_CHECKS = 256  # (check, interval) pairs over all C-VMs of one A-VM
MAX_SEQ = 2**64 - 1

# Ids end up in file names, log lines and SQL keys on the REM-S: keep them to a
# conservative alphabet so none of those places needs escaping.
Id = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
# Check ids keep the stable `area.name` form of DESIGN.md.
CheckId = Annotated[
    str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}(\.[a-z][a-z0-9_]{0,31}){1,3}$")
]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
NonceHex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
RequestId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16,64}$")]
DigestHex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{40,128}$")]
PcrIndex = Annotated[str, StringConstraints(pattern=r"^(?:[0-9]|1[0-9]|2[0-3])$")]
PcrBank = Literal["sha1", "sha256", "sha384", "sha512"]
ShortText = Annotated[str, StringConstraints(max_length=256)]
Seq = Annotated[int, Field(ge=1, le=MAX_SEQ)]
# Checks that need parameters from the policy and so are never part of "every check":
# vims.checks marks the same ones default = False. Each with what its params say.
OPT_IN_CHECKS: Mapping[str, str] = MappingProxyType({
    "behaviour.trace": "model: the digest vims behaviour show prints",
    "process.address_spaces": "window_s: seconds of CR3 events per round, 1-60",
})

Scalar = bool | int | float | Annotated[str, StringConstraints(max_length=1024)]


def canonical_json(obj: Any) -> bytes:
    """Encode *obj* canonically: the one byte form both sides hash and sign."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _check_b64(value: str) -> str:
    # Decoding now, not when the verifier runs, keeps garbage out of the core.
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not valid base64") from exc
    return value


class _Model(BaseModel):
    """Strict, closed models: unknown fields are an attack surface, not a feature."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class _Message(_Model):
    version: Literal[1] = 1  # PROTOCOL_VERSION


# --- parts -------------------------------------------------------------------


class Capabilities(_Model):
    """What the A-VM can run: the REM-S must not ask for checks it lacks."""

    checks: Annotated[list[CheckId], Field(max_length=64)]
    backends: Annotated[
        list[Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]],
        Field(min_length=1, max_length=8),
    ]


class ChainHead(_Model):
    """Last report of a C-VM the REM-S accepted (seq 0 and zeros: none yet)."""

    seq: Annotated[int, Field(ge=0, le=MAX_SEQ)]
    digest: Sha256Hex


class Quote(_Model):
    """A vTPM quote: TPMS_ATTEST and TPMT_SIGNATURE (base64) and the quoted PCRs."""

    attest_b64: Annotated[str, StringConstraints(min_length=4, max_length=MAX_B64_ATTEST)]
    signature_b64: Annotated[str, StringConstraints(min_length=4, max_length=MAX_B64_SIGNATURE)]
    pcrs: Annotated[
        dict[PcrBank, Annotated[dict[PcrIndex, DigestHex], Field(max_length=24)]],
        Field(max_length=4),
    ]

    _b64 = field_validator("attest_b64", "signature_b64")(_check_b64)

    @property
    def attest(self) -> bytes:
        return base64.b64decode(self.attest_b64)

    @property
    def signature(self) -> bytes:
        return base64.b64decode(self.signature_b64)


class EventLogEntry(_Model):
    """One measured-boot event (TCG event log), as the verifier replays it."""

    pcr: Annotated[int, Field(ge=0, le=23)]
    digest: DigestHex
    type: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    description: ShortText = ""


class CheckSpec(_Model):
    """One check the policy asks for, how often, and on which C-VMs (None: all of them)."""

    id: CheckId
    interval_s: Annotated[float, Field(ge=0.1, le=86400)]
    params: Annotated[dict[Id, Scalar], Field(max_length=32)] = Field(default_factory=dict)
    cvms: Annotated[list[Id], Field(min_length=1, max_length=MAX_CVMS)] | None = None

    def applies_to(self, cvm: str) -> bool:
        return self.cvms is None or cvm in self.cvms


class PolicySpec(_Model):
    """The policy document; its digest is SHA-256 of its canonical encoding."""

    policy_id: Id
    version: Annotated[int, Field(ge=1, le=2**31 - 1)]
    checks: Annotated[list[CheckSpec], Field(min_length=1, max_length=MAX_POLICY_CHECKS)]
    quote_every: Annotated[int, Field(ge=1, le=10_000)]
    heartbeat_s: Annotated[float, Field(ge=0.5, le=3600)]
    thresholds: Annotated[dict[Id, Scalar], Field(max_length=64)] = Field(default_factory=dict)


def policy_digest(spec: PolicySpec) -> str:
    """Hex SHA-256 of the canonical policy: what the A-VM acknowledges."""
    return hashlib.sha256(canonical_json(spec.model_dump(mode="json"))).hexdigest()


def _check_policy_digest(spec: PolicySpec, digest: str) -> None:
    # A digest that does not match would make the A-VM acknowledge something else
    # than what it runs; refuse it at the edge.
    if policy_digest(spec) != digest:
        raise ValueError("policy digest does not match the policy")


# --- messages ------------------------------------------------------------------


class Hello(_Message):
    """A-VM -> REM-S, first frame: who I am and which C-VMs I guard."""

    type: Literal["hello"] = "hello"
    avm_id: Id
    cvms: Annotated[list[Id], Field(min_length=1, max_length=MAX_CVMS)]
    capabilities: Capabilities
    # The A-VM's own view (informational): the REM-S's ChainHeads are authoritative.
    resume_from: Annotated[
        dict[Id, Annotated[int, Field(ge=0, le=MAX_SEQ)]], Field(max_length=MAX_CVMS)
    ] | None = None

    @field_validator("cvms")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("duplicate C-VM names")
        return value


class Challenge(_Message):
    """REM-S -> A-VM: the session nonce and, per C-VM, the chain head to resume from."""

    type: Literal["challenge"] = "challenge"
    nonce: NonceHex
    resume: Annotated[dict[Id, ChainHead], Field(max_length=MAX_CVMS)] = Field(
        default_factory=dict
    )


class Evidence(_Message):
    """A-VM -> REM-S: a quote over the challenge nonce, the event log and the AK name."""

    type: Literal["evidence"] = "evidence"
    quote: Quote
    event_log: Annotated[list[EventLogEntry], Field(max_length=MAX_EVENT_LOG)]
    ak_name: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{8,132}$")]


class Policy(_Message):
    """REM-S -> A-VM after successful appraisal: what to check and how often."""

    type: Literal["policy"] = "policy"
    policy: PolicySpec
    digest: Sha256Hex

    @model_validator(mode="after")
    def _digest_matches(self) -> Policy:
        _check_policy_digest(self.policy, self.digest)
        return self


class PolicyUpdate(_Message):
    """REM-S -> A-VM at any time once active: replaces the policy."""

    type: Literal["policy_update"] = "policy_update"
    policy: PolicySpec
    digest: Sha256Hex

    @model_validator(mode="after")
    def _digest_matches(self) -> PolicyUpdate:
        _check_policy_digest(self.policy, self.digest)
        return self


class PolicyAck(_Message):
    """A-VM -> REM-S: the policy (by id, version and digest) is in force."""

    type: Literal["policy_ack"] = "policy_ack"
    policy_id: Id
    policy_version: Annotated[int, Field(ge=1, le=2**31 - 1)]
    digest: Sha256Hex


Category = Literal["instance-identity", "configuration", "executables", "file-system",
                   "hardware", "runtime-opaque", "storage-opaque", "sourced-data"]
Severity = Literal["low", "medium", "high", "critical"]


class _BodyPart(BaseModel):
    # Lax on numbers (a duration may be an int), strict on shape; extra keys pass (a
    # newer A-VM may add some), but everything the REM-S judges by is checked here.
    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)


class ReportCheck(_BodyPart):
    """One check's entry in a report body (docs/report.schema.json)."""

    id: CheckId
    status: Literal["pass", "fail", "error", "not_applicable"]
    category: Category
    severity: Severity | None = None
    error: Annotated[str, StringConstraints(max_length=4096)] | None = None
    findings: Annotated[int, Field(ge=0)] | None = None


class ReportFinding(_BodyPart):
    """One finding in a report body; its check must be listed in the body's checks."""

    check: CheckId
    severity: Severity
    summary: Annotated[str, StringConstraints(max_length=4096)]


class ReportBody(_BodyPart):
    """What the REM-S appraises in a report body: the checks and their findings."""

    result: Literal["pass", "fail", "error"]
    checks: Annotated[list[ReportCheck], Field(max_length=256)]
    findings: Annotated[list[ReportFinding], Field(max_length=10_000)]

    @model_validator(mode="after")
    def _consistent(self) -> ReportBody:
        listed = [c.id for c in self.checks]
        if len(set(listed)) != len(listed):
            raise ValueError("a check is listed twice")
        orphans = {f.check for f in self.findings} - set(listed)
        if orphans:
            raise ValueError(f"findings of unlisted checks: {', '.join(sorted(orphans))}")
        return self


_REPORT_BODY: TypeAdapter[ReportBody] = TypeAdapter(ReportBody)


class Report(_Message):
    """A-VM -> REM-S: one introspection report of one C-VM, hash-chained."""

    type: Literal["report"] = "report"
    cvm: Id
    seq: Seq
    prev_hash: Sha256Hex
    body: dict[str, Any]
    quote: Quote | None = None
    # Set on the report that answers a RoundRequest; covered by the report digest.
    request_id: RequestId | None = None

    @field_validator("body")
    @classmethod
    def _bounded_body(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            size = len(canonical_json(value))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"body is not canonical JSON: {exc}") from exc
        if size > MAX_REPORT_BODY:
            raise ValueError(f"body is {size} bytes, limit {MAX_REPORT_BODY}")
        # The wrong shape is this A-VM's protocol error, never the REM-S's crash later.
        try:
            _REPORT_BODY.validate_python(value)
        except ValidationError as exc:
            err = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(p) for p in err["loc"]) or "body"
            raise ValueError(f"report body {where}: {err['msg']}"[:300]) from None
        return value


class RoundRequest(_Message):
    """REM-S -> A-VM once active: run a full round on *cvm* now and quote it over *nonce*.

    The answer is the next report of that C-VM carrying ``request_id``; its quote
    covers SHA256(nonce || report digest), so it proves the report is fresh.
    """

    type: Literal["round_request"] = "round_request"
    request_id: RequestId
    cvm: Id
    nonce: NonceHex


class ReportAck(_Message):
    """REM-S -> A-VM: the report is stored; the A-VM may forget it."""

    type: Literal["report_ack"] = "report_ack"
    cvm: Id
    seq: Seq


class Heartbeat(_Message):
    """Either way: keeps an idle channel provably alive."""

    type: Literal["heartbeat"] = "heartbeat"


class ErrorMessage(_Message):
    """Either way: the sender found a protocol violation and closes."""

    type: Literal["error"] = "error"
    code: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    message: Annotated[str, StringConstraints(max_length=512)] = ""


class Bye(_Message):
    """Either way: orderly close."""

    type: Literal["bye"] = "bye"
    reason: ShortText = ""


Message = Annotated[
    Hello
    | Challenge
    | Evidence
    | Policy
    | PolicyAck
    | PolicyUpdate
    | Report
    | ReportAck
    | RoundRequest
    | Heartbeat
    | ErrorMessage
    | Bye,
    Field(discriminator="type"),
]

_MESSAGE_ADAPTER: TypeAdapter[Message] = TypeAdapter(Message)


class MessageDecodeError(ValueError):
    """A frame's payload is not a valid message; ``code`` says which way."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def decode_message(payload: bytes) -> Message:
    """Parse and validate one frame payload, or raise :class:`MessageDecodeError`."""
    try:
        return _MESSAGE_ADAPTER.validate_json(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        first = errors[0] if errors else {"type": "invalid", "loc": (), "msg": str(exc)}
        kind = first["type"]
        loc = ".".join(str(part) for part in first["loc"])
        if kind == "json_invalid" or (kind in ("dict_type", "model_type") and not first["loc"]):
            code = "malformed"
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            code = "unknown_type"
        elif kind == "literal_error" and first["loc"][-1:] == ("version",):
            code = "unsupported_version"
        else:
            code = "invalid_message"
        detail = f"{kind} at {loc or '<root>'}: {first['msg']}"
        raise MessageDecodeError(code, detail[:400]) from None


def encode_message(msg: BaseModel) -> bytes:
    """The canonical payload of *msg* (the frame body, before the length prefix)."""
    return canonical_json(msg.model_dump(mode="json", exclude_none=True))


def report_digest(report: Report) -> bytes:
    """SHA-256 of the report's canonical encoding without its quote.

    The quote is left out because it signs this very digest; everything else
    (cvm, seq, prev_hash, body, type, version) is covered, so the next report's
    ``prev_hash`` commits to the whole chain before it.
    """
    data = report.model_dump(mode="json", exclude_none=True, exclude={"quote"})
    return hashlib.sha256(canonical_json(data)).digest()


def quote_qualifying_data(nonce: bytes, digest: bytes) -> bytes:
    """What a report quote must carry as qualifying data: SHA256(nonce || digest)."""
    if len(nonce) != NONCE_BYTES or len(digest) != 32:
        raise ValueError("nonce and report digest must both be 32 bytes")
    return hashlib.sha256(nonce + digest).digest()
