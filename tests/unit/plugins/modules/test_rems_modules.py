"""policy, attest and avm_registration against a real REM-S (the runtime's ``vims rems serve``)."""

from __future__ import annotations

import pytest
from ansible_collections.vims.attestation.plugins.modules import attest, avm_registration, policy

from ..conftest import TOKEN, Rems, run_module


def policy_args(rems: Rems, **over: object) -> dict[str, object]:
    args: dict[str, object] = {
        "rems_url": rems.url, "ca_path": str(rems.ca), "token_file": str(rems.token_file),
        "name": "lab",
        "checks": [{"id": "kernel.text", "interval_s": 10},
                   {"id": "kernel.syscall_table", "interval_s": 2}],
        "quote_every": 3, "cvms": ["cvm1"]}
    args.update(over)
    return args


def test_policy_check_real_idempotent_check_idempotent_real(rems: Rems) -> None:
    # The four runs STYLE.md asks for: check, real, idempotent check, idempotent real.
    failed, r = run_module(policy.main, policy_args(rems), check_mode=True, diff=True)
    assert not failed
    assert r["changed"]
    assert r["assigned"] == ["cvm1"]
    assert r["diff"]["before"]["policy"] is None
    assert r["diff"]["after"]["cvms"] == ["cvm1"]
    assert rems.get("/v1/cvms") == []  # check mode wrote nothing

    failed, r = run_module(policy.main, policy_args(rems))
    assert not failed
    assert r["changed"]
    assert r["version"] == 1
    stored = rems.get("/v1/policies/lab")
    assert isinstance(stored, dict)
    assert [c["id"] for c in stored["policy"]["checks"]] == ["kernel.text",
                                                              "kernel.syscall_table"]
    assert stored["policy"]["quote_every"] == 3

    for check_mode in (True, False):
        failed, r = run_module(policy.main, policy_args(rems), check_mode=check_mode)
        assert not failed, r
        assert not r["changed"]
        assert r["assigned"] == []
        assert r["version"] == 1


def test_policy_change_makes_a_new_version(rems: Rems) -> None:
    run_module(policy.main, policy_args(rems))
    changed = policy_args(rems, checks=[{"id": "kernel.text", "interval_s": 5}])
    failed, r = run_module(policy.main, changed, check_mode=True, diff=True)
    assert not failed
    assert r["changed"]
    assert r["version"] == 1
    assert r["assigned"] == []
    assert r["diff"]["before"]["policy"]["checks"][0]["interval_s"] == 10
    failed, r = run_module(policy.main, changed)
    assert not failed
    assert r["changed"]
    assert r["version"] == 2


def test_policy_bad_token_fails_with_one_line(rems: Rems) -> None:
    args = policy_args(rems, token="wrong-token-xxxxxxxxxx")
    del args["token_file"]
    failed, r = run_module(policy.main, args)
    assert failed
    assert "HTTP 401" in str(r["msg"])
    assert "\n" not in str(r["msg"])
    assert "wrong-token" not in str(r)  # no_log: the secret is not echoed back


def test_policy_rejected_check_id_is_reported(rems: Rems) -> None:
    failed, r = run_module(policy.main, policy_args(rems, checks=[{"id": "Not An Id"}]))
    assert failed
    assert "HTTP 422" in str(r["msg"])
    assert "checks.0.id" in str(r["msg"])


def test_attest_unknown_and_unguarded_cvm(rems: Rems) -> None:
    args = {"rems_url": rems.url, "ca_path": str(rems.ca), "token": TOKEN, "cvm": "nosuch",
            "timeout": 2}
    failed, r = run_module(attest.main, args)
    assert failed
    assert r["http_status"] == 404
    assert "does not know this C-VM" in str(r["msg"])
    run_module(policy.main, policy_args(rems))  # cvm1 is now known, but no A-VM guards it
    failed, r = run_module(attest.main, dict(args, cvm="cvm1"), check_mode=True)
    assert failed
    assert r["http_status"] == 503
    assert "no A-VM" in str(r["msg"])


def test_attest_unreachable_rems() -> None:
    failed, r = run_module(attest.main, {"rems_url": "http://127.0.0.1:9", "token": TOKEN,
                                         "cvm": "cvm1"})
    assert failed
    assert "unreachable" in str(r["msg"])


def test_attest_refuses_a_url_without_scheme() -> None:
    failed, r = run_module(attest.main, {"rems_url": "127.0.0.1:8080", "token": TOKEN,
                                         "cvm": "cvm1"})
    assert failed
    assert "must start with http" in str(r["msg"])


def test_policy_check_params_are_stored_and_idempotent(rems: Rems) -> None:
    model = "sha256:" + "5f" * 32
    traced = [{"id": "behaviour.trace", "interval_s": 2, "params": {"model": model}}]
    failed, r = run_module(policy.main, policy_args(rems, checks=traced))
    assert not failed, r
    assert r["changed"]
    stored = rems.get("/v1/policies/lab")
    assert isinstance(stored, dict)
    assert stored["policy"]["checks"][0]["params"] == {"model": model}
    failed, r = run_module(policy.main, policy_args(rems, checks=traced))
    assert not failed
    assert not r["changed"]
    # A tracing check without its model is refused by the REM-S, in one line.
    failed, r = run_module(policy.main, policy_args(
        rems, checks=[{"id": "behaviour.trace", "interval_s": 2}]))
    assert failed
    assert "needs params" in str(r["msg"])


def registration_args(rems: Rems, **over: object) -> dict[str, object]:
    args: dict[str, object] = {
        "rems_url": rems.url, "ca_path": str(rems.ca), "token_file": str(rems.token_file),
        "avm_id": "avm1", "cvms": ["cvm1"],
        "references": [{"kind": "agent-code", "subject": "avm1", "digest": "a1" * 32},
                       {"kind": "baseline", "subject": "cvm1", "digest": "b1" * 32,
                        "scope": "cvm"}]}
    args.update(over)
    return args


def test_avm_registration_check_real_idempotent_check_idempotent_real(rems: Rems) -> None:
    failed, r = run_module(avm_registration.main, registration_args(rems), check_mode=True,
                           diff=True)
    assert not failed, r
    assert r["changed"]
    assert r["bound"] == ["cvm1"]
    assert r["references_changed"] == ["agent-code:avm1", "baseline:cvm1"]
    assert r["diff"]["after"]["bindings"] == {"cvm1": "avm1"}
    assert rems.get("/v1/avms/avm1") == {"avm": "avm1", "enrolled": False, "cvms": [],
                                         "references": {}}  # check mode wrote nothing
    failed, r = run_module(avm_registration.main, registration_args(rems))
    assert not failed, r
    assert r["changed"]
    assert rems.get("/v1/avms/avm1") == {"avm": "avm1", "enrolled": False, "cvms": ["cvm1"],
                                         "references": {"agent-code": "a1" * 32}}
    for check_mode in (True, False):
        failed, r = run_module(avm_registration.main, registration_args(rems),
                               check_mode=check_mode)
        assert not failed, r
        assert not r["changed"]


def test_avm_registration_never_moves_a_cvm_silently(rems: Rems) -> None:
    run_module(avm_registration.main, registration_args(rems))
    other = registration_args(rems, avm_id="avm2", references=[])
    failed, r = run_module(avm_registration.main, other)
    assert failed
    assert "bound to another A-VM: cvm1 (avm1)" in str(r["msg"])
    failed, r = run_module(avm_registration.main, dict(other, move=True))
    assert not failed, r
    assert r["bound"] == ["cvm1"]
    assert rems.get("/v1/avms/avm2")["cvms"] == ["cvm1"]  # type: ignore[index]


def test_avm_registration_enrollment_token_does_nothing_else(rems: Rems) -> None:
    import urllib.error

    failed, r = run_module(avm_registration.main, registration_args(
        rems, cvms=[], references=[], enrollment_token=True))
    assert not failed, r
    token = str(r["enrollment_token"])
    assert token.startswith("vims_")
    args = policy_args(rems, token=token)
    del args["token_file"]
    failed, r = run_module(policy.main, args)
    assert failed
    assert "HTTP 403" in str(r["msg"])  # the REM-S refuses it for anything but enrollment
    with pytest.raises(urllib.error.HTTPError) as missing:
        Rems(rems.url, rems.token_file, rems.ca).get("/v1/policies/lab")
    assert missing.value.code == 404  # the operator token reads: nothing was written


def test_avm_registration_refuses_a_bad_digest(rems: Rems) -> None:
    failed, r = run_module(avm_registration.main, registration_args(rems, references=[
        {"kind": "baseline", "subject": "cvm1", "digest": "not-a-digest"}]))
    assert failed
    assert "sha256 hex" in str(r["msg"])


def test_approve_reference_is_idempotent_and_honours_check_mode(rems: Rems) -> None:
    """What the baseline module does with rems_url: approve its digest for the C-VM."""
    from ansible_collections.vims.attestation.plugins.module_utils._rems import (
        RemsClient,
        approve_reference,
    )

    client = RemsClient(rems.url, rems.token_file.read_text().strip(), ca_path=str(rems.ca))
    digest = "cd" * 32
    assert approve_reference(client, "baseline", "cvm1", digest, check_mode=True) is True
    assert rems.get("/v1/cvms/cvm1")["references"] == {}  # type: ignore[index]
    assert approve_reference(client, "baseline", "cvm1", digest) is True
    assert rems.get("/v1/cvms/cvm1")["references"] == {"baseline": digest}  # type: ignore[index]
    assert approve_reference(client, "baseline", "cvm1", digest) is False
    assert approve_reference(client, "agent-code", "avm1", digest) is True
    assert rems.get("/v1/avms/avm1")["references"] == {"agent-code": digest}  # type: ignore[index]
