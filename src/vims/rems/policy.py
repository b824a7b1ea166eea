"""The REM-S policy document: which checks, how often, how verdicts are judged.

One pydantic model validates a policy wherever it enters: ``PUT
/v1/policies/{name}`` (and so the ``policy`` module), and the REM-S's own
loader, which reads stored policies through it too. A stored policy that no
longer validates (written by an older REM-S) is a policy error: its C-VMs are
denied with that reason, never judged by half a policy.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from vims.protocol.messages import OPT_IN_CHECKS, CheckId, CheckSpec, Id, Scalar
from vims.rems.verdict import (
    DEFAULT_CHECKS,
    DEFAULT_INTERVAL_S,
    DEFAULT_STALE_AFTER,
    ExpectedCheck,
    PolicyError,
    VerdictPolicy,
)

MAX_POLICY_CHECKS = 64
# A check must report at least every day and at most ten times a second.
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.1, 86400.0

Interval = Annotated[float, Field(ge=MIN_INTERVAL_S, le=MAX_INTERVAL_S, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class PolicyCheck(_Strict):
    """One check of a policy and its interval."""

    id: CheckId
    interval_s: Interval = DEFAULT_INTERVAL_S
    params: Annotated[dict[Id, Scalar], Field(max_length=32)] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _channel_accepts_it(self) -> PolicyCheck:
        if self.id in OPT_IN_CHECKS and not self.params:
            raise ValueError(f"{self.id} needs params ({OPT_IN_CHECKS[self.id]})")
        # What the A-VM will be sent: refuse here what the channel would refuse.
        CheckSpec(id=self.id, interval_s=self.interval_s, params=self.params)
        return self


class PolicyDocument(_Strict):
    """A policy as an operator writes it (``name`` is set from the URL)."""

    name: Id = "default"
    checks: Annotated[list[PolicyCheck], Field(min_length=1, max_length=MAX_POLICY_CHECKS)]
    quote_every: Annotated[StrictInt, Field(ge=1, le=10_000)] = 5
    heartbeat_s: Annotated[float, Field(ge=0.5, le=3600, allow_inf_nan=False)] = 5.0
    stale_after_intervals: Annotated[StrictInt, Field(ge=1, le=100)] = DEFAULT_STALE_AFTER
    verdict: dict[str, Any] = Field(default_factory=dict)
    allow_warning: StrictBool | None = None  # shorthand for verdict.allow_warning

    @field_validator("checks")
    @classmethod
    def _unique(cls, checks: list[PolicyCheck]) -> list[PolicyCheck]:
        seen: set[str] = set()
        for c in checks:
            if c.id in seen:
                raise ValueError(f"check {c.id} is listed twice")
            seen.add(c.id)
        return checks

    @model_validator(mode="after")
    def _verdict_rules(self) -> PolicyDocument:
        try:
            self.verdict_policy(1)
        except PolicyError as exc:
            raise ValueError(f"verdict: {exc}") from exc
        return self

    def verdict_policy(self, version: int) -> VerdictPolicy:
        data = {**self.verdict, "name": self.name, "version": version}
        if self.allow_warning is not None:
            data["allow_warning"] = self.allow_warning
        return VerdictPolicy.from_dict(data)

    def expected(self) -> list[ExpectedCheck]:
        """The checks a C-VM under this policy must keep reporting."""
        return [ExpectedCheck(c.id, c.interval_s) for c in self.checks]

    def body(self) -> dict[str, Any]:
        """The canonical stored form (defaults made explicit)."""
        return self.model_dump(mode="json", exclude_none=True)


DEFAULT_POLICY = PolicyDocument(checks=[PolicyCheck(id=c) for c in DEFAULT_CHECKS])


def parse_policy(body: Any, name: str | None = None) -> PolicyDocument:
    """Validate a policy document; raises :class:`PolicyError` with one line."""
    if not isinstance(body, dict):
        raise PolicyError("a policy must be a JSON object")
    data = {**body, "name": name} if name is not None else body
    try:
        doc = PolicyDocument.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "policy"
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise PolicyError(f"{where}: {msg}"[:300]) from None
    try:  # what is stored and audited is canonical JSON: finite numbers, valid UTF-8
        json.dumps(doc.body(), allow_nan=False, ensure_ascii=False).encode()
    except (ValueError, UnicodeEncodeError) as exc:
        raise PolicyError(f"policy: not storable as JSON ({type(exc).__name__})") from None
    return doc
