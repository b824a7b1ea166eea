"""policy and attest against a real REM-S (the runtime's ``vims rems serve``)."""

from __future__ import annotations

from ansible_collections.vims.attestation.plugins.modules import attest, policy

from ..conftest import TOKEN, Rems, run_module


def policy_args(rems: Rems, **over: object) -> dict[str, object]:
    args: dict[str, object] = {
        "rems_url": rems.url, "token_file": str(rems.token_file), "name": "lab",
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
    assert "check needs an id" in str(r["msg"])


def test_attest_unknown_and_unguarded_cvm(rems: Rems) -> None:
    args = {"rems_url": rems.url, "token": TOKEN, "cvm": "nosuch", "timeout": 2}
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
