#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: VIMS developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: policy
short_description: Declare a REM-S attestation policy and assign it to C-VMs
version_added: 0.1.0
description:
  - Makes the REM-S hold the policy O(name) exactly as given (which checks, how
    often, the verdict rules) and assigns it to the C-VMs in O(cvms).
  - Idempotent; the REM-S validates the policy with its own schema and compares it
    with its copy (a dry run in check mode), so only a real change creates a new
    policy version (which the REM-S pushes to the A-VMs).
  - A C-VM is judged over every check of its policy; a check that stops reporting
    for O(stale_after_intervals) of its own intervals makes the verdict lapse.
author:
  - VIMS developers (@vims-dev)
extends_documentation_fragment:
  - vims.attestation.rems
  - vims.attestation.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
options:
  name:
    description:
      - The policy's name.
    type: str
    required: true
  checks:
    description:
      - The checks the A-VM runs and how often.
    type: list
    elements: dict
    required: true
    suboptions:
      id:
        description:
          - A check id such as C(kernel.text).
        type: str
        required: true
      interval_s:
        description:
          - Seconds between two runs of the check.
        type: float
        default: 10
      params:
        description:
          - Parameters the check takes from the policy (names to scalars).
          - C(behaviour.trace) needs C(model), the digest C(vims behaviour show) prints
            of a model in the A-VM's models directory; C(gate) arms tracing only while
            a monitored process runs.
          - C(process.address_spaces) needs C(window_s), the seconds of CR3-write events
            each round listens to (1-60; live Xen HVM/PVH C-VMs).
        type: dict
  verdict:
    description:
      - Verdict rules (JMESPath over reports), as the REM-S's policy format defines them.
      - Omitted means the REM-S's default rules.
    type: dict
  stale_after_intervals:
    description:
      - A check's passing result counts for this many of its own intervals; a check
        with no newer result makes the C-VM's verdict lapse (the gate denies it).
      - 1 to 100.
    type: int
    default: 3
  heartbeat_s:
    description:
      - Seconds between heartbeats on an idle control channel (0.5 to 3600).
    type: float
    default: 5
  quote_every:
    description:
      - Every N-th report is bound to a fresh vTPM quote.
    type: int
    default: 5
  cvms:
    description:
      - C-VMs that get this policy. C-VMs not listed keep theirs.
    type: list
    elements: str
    default: []
seealso:
  - module: vims.attestation.attest
"""

EXAMPLES = r"""
- name: Every check every 10 s for the lab C-VM
  vims.attestation.policy:
    rems_url: http://127.0.0.1:8080
    token_file: /etc/vims/admin.token
    name: lab
    checks:
      - {id: kernel.text, interval_s: 10}
      - {id: kernel.syscall_table, interval_s: 2}
      - {id: process.hidden, interval_s: 5}
    quote_every: 3
    cvms: [cvm1]

- name: Enforce httpd's learned system-call model (vims behaviour learn)
  vims.attestation.policy:
    rems_url: http://127.0.0.1:8080
    token_file: /etc/vims/admin.token
    name: web-traced
    checks:
      - id: behaviour.trace
        interval_s: 2
        params: {model: "sha256:5f3eb5e34fb2df035e4bdbf98e31b1432cc2395b6d8bd4d1ac026e044c432210"}
    cvms: [cvm1]
"""

RETURN = r"""
version:
  description: The policy's version on the REM-S after the task (unchanged in check mode).
  returned: success
  type: int
  sample: 2
policy:
  description: The policy as the REM-S stores it (validated, defaults made explicit).
  returned: success
  type: dict
assigned:
  description: C-VMs whose assignment the task changed (or would change in check mode).
  returned: success
  type: list
  elements: str
diff:
  description: The policy before and after, with the C-VMs assigned to it.
  returned: when diff mode is on
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vims.attestation.plugins.module_utils._rems import (
    REMS_ARGUMENT_SPEC,
    REMS_MUTUALLY_EXCLUSIVE,
    RemsClient,
    RemsError,
)


def _check(spec):
    out = dict(id=spec["id"], interval_s=spec["interval_s"])
    if spec.get("params"):
        out["params"] = spec["params"]
    return out


def desired_policy(params):
    """The policy body as the operator wrote it (the REM-S validates and normalizes it)."""
    body = dict(
        checks=[_check(c) for c in params["checks"]],
        stale_after_intervals=params["stale_after_intervals"],
        quote_every=params["quote_every"],
        heartbeat_s=params["heartbeat_s"],
    )
    if params["verdict"] is not None:
        body["verdict"] = params["verdict"]
    return body


def current_state(client, name):
    """(stored policy body or None, {cvm: policy name})."""
    try:
        _s, found = client.request("GET", "/v1/policies/%s" % name)
        stored = found["policy"]
    except RemsError as exc:
        if exc.status != 404:
            raise
        stored = None
    _s, rows = client.request("GET", "/v1/cvms")
    assignments = dict((r["cvm"], r.get("policy")) for r in rows or [])
    return stored, assignments


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            REMS_ARGUMENT_SPEC,
            name=dict(type="str", required=True),
            checks=dict(type="list", elements="dict", required=True, options=dict(
                id=dict(type="str", required=True),
                interval_s=dict(type="float", default=10),
                params=dict(type="dict"),
            )),
            verdict=dict(type="dict"),
            stale_after_intervals=dict(type="int", default=3),
            quote_every=dict(type="int", default=5),
            heartbeat_s=dict(type="float", default=5),
            cvms=dict(type="list", elements="str", default=[]),
        ),
        mutually_exclusive=REMS_MUTUALLY_EXCLUSIVE,
        required_one_of=[("token", "token_file")],
        supports_check_mode=True,
    )
    p = module.params
    client = RemsClient.from_module(module)
    want = desired_policy(p)
    path = "/v1/policies/%s" % p["name"]
    try:
        stored, assignments = current_state(client, p["name"])
        # The REM-S validates (one schema for API, loader and this module) and says
        # whether it would change; in check mode nothing is written.
        _s, put = client.request("PUT", path + ("?dry_run=true" if module.check_mode else ""),
                                 want)
        policy_changed, version, normal = put["changed"], put["version"], put["policy"]
        to_assign = [c for c in p["cvms"] if assignments.get(c) != p["name"]]
        if not module.check_mode:
            for cvm in to_assign:
                client.request("PUT", "/v1/cvms/%s/policy" % cvm, {"policy": p["name"]})
    except RemsError as exc:
        module.fail_json(msg=str(exc), http_status=exc.status)
    except (KeyError, TypeError) as exc:
        module.fail_json(msg="unexpected REM-S answer: missing %s" % exc)

    result = dict(changed=policy_changed or bool(to_assign), version=version,
                  assigned=to_assign, policy=normal)
    if module._diff:
        before_cvms = sorted(c for c, pol in assignments.items() if pol == p["name"])
        result["diff"] = dict(
            before=dict(policy=stored, cvms=before_cvms),
            after=dict(policy=normal, cvms=sorted(set(before_cvms) | set(p["cvms"]))),
        )
    module.exit_json(**result)


if __name__ == "__main__":
    main()
