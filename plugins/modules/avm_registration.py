#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: VIMS developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: avm_registration
short_description: Register an A-VM at the REM-S, the C-VMs it guards and what it measures
version_added: 0.2.0
description:
  - Binds the C-VMs in O(cvms) to the A-VM O(avm_id) at the REM-S. Only the A-VM a C-VM
    is bound to may report on it; the REM-S refuses a handshake or a report of any other
    A-VM for it, and never tells another A-VM that C-VM's chain head.
  - A C-VM bound to another A-VM is moved only with O(move=true), an explicit operator
    action; the REM-S then drops the C-VM's recorded results, so its verdict lapses until
    the new A-VM reports.
  - Approves the digests the A-VM measures into its vTPM's PCR 23, given in
    O(references) as C(vims avm measure --format json) prints them; its agent code and
    configuration, and each C-VM's profile, baseline and local policy. An A-VM whose
    measurements differ
    from the approved digests is not believed, so a baseline nobody approved cannot
    make a C-VM trusted.
  - With O(enrollment_token=true), returns a fresh single-use token that can enroll this
    A-VM and do nothing else, so the A-VM host never needs the operator token. Run the
    task with C(no_log) and hand RV(enrollment_token) to M(vims.attestation.enroll).
  - Needs the REM-S operator token; run it where that token is (the REM-S host).
author:
  - VIMS developers (@vims-dev)
extends_documentation_fragment:
  - vims.attestation.rems
  - vims.attestation.attributes
attributes:
  check_mode:
    support: full
    details:
      - Reports what would change; issues no token.
  diff_mode:
    support: full
options:
  avm_id:
    description:
      - The A-VM's identity (its certificate's name).
    type: str
    required: true
  cvms:
    description:
      - The C-VMs this A-VM guards. C-VMs bound to it but not listed stay bound.
    type: list
    elements: str
    default: []
  move:
    description:
      - Move C-VMs now bound to another A-VM to this one.
    type: bool
    default: false
  references:
    description:
      - Digests to approve, as C(vims avm measure --format json) prints them.
    type: list
    elements: dict
    default: []
    suboptions:
      kind:
        description:
          - C(agent-code) or C(agent-config) (of the A-VM), C(profile), C(baseline) or
            C(local-policy) (of a C-VM).
        type: str
        required: true
        choices: [agent-code, agent-config, profile, baseline, local-policy]
      subject:
        description:
          - The A-VM (for its own kinds) or the C-VM the digest is of.
        type: str
        required: true
      digest:
        description:
          - SHA-256 of what is measured, lowercase hex.
        type: str
        required: true
      scope:
        description:
          - C(avm) or C(cvm); implied by O(references[].kind).
        type: str
        choices: [avm, cvm]
  enrollment_token:
    description:
      - Issue a single-use enrollment token for this A-VM (returned as RV(enrollment_token)).
    type: bool
    default: false
  enrollment_token_ttl:
    description:
      - Seconds the enrollment token stays valid.
    type: int
    default: 900
seealso:
  - module: vims.attestation.enroll
  - module: vims.attestation.policy
"""

EXAMPLES = r"""
- name: What the agent will measure
  ansible.builtin.command:
    argv: [/opt/vims/venv/bin/vims, avm, measure, --config, /etc/vims/avm.toml, --format, json]
  register: measured
  changed_when: false

- name: Bind cvm1 to avm1, approve its measurements, get an enrollment token
  vims.attestation.avm_registration:
    rems_url: https://rems.example.org:8080
    ca_path: /var/lib/vims/rems/pki/ca.pem
    token_file: /etc/vims/admin.token
    avm_id: avm1
    cvms: [cvm1]
    references: "{{ measured.stdout | from_json }}"
    enrollment_token: true
  delegate_to: rems.example.org
  no_log: true
  register: registration
"""

RETURN = r"""
bound:
  description: C-VMs whose binding the task changed (or would change in check mode).
  returned: success
  type: list
  elements: str
references_changed:
  description: The references (C(kind:subject)) the task changed or would change.
  returned: success
  type: list
  elements: str
enrollment_token:
  description: The single-use enrollment token, when O(enrollment_token=true) and not in
    check mode. A secret; register the task with C(no_log).
  returned: when requested
  type: str
"""

import re

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vims.attestation.plugins.module_utils._rems import (
    REMS_ARGUMENT_SPEC,
    REMS_MUTUALLY_EXCLUSIVE,
    RemsClient,
    RemsError,
)

AVM_KINDS = ("agent-code", "agent-config")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _scope(ref):
    return "avm" if ref["kind"] in AVM_KINDS else "cvm"


def validate(module):
    p = module.params
    for name in [p["avm_id"]] + p["cvms"]:
        if not NAME.match(name):
            module.fail_json(msg="%r is not an A-VM or C-VM name" % name)
    for ref in p["references"]:
        if ref.get("scope") and ref["scope"] != _scope(ref):
            module.fail_json(msg="reference %s of %s: scope %s does not fit the kind"
                             % (ref["kind"], ref["subject"], ref["scope"]))
        if not NAME.match(ref["subject"]) or not SHA256.match(ref["digest"]):
            module.fail_json(msg="reference %s of %r: bad subject or digest (sha256 hex)"
                             % (ref["kind"], ref["subject"]))
        if _scope(ref) == "avm" and ref["subject"] != p["avm_id"]:
            module.fail_json(msg="%s names A-VM %s, not %s" % (ref["kind"], ref["subject"],
                                                               p["avm_id"]))
    if not 60 <= p["enrollment_token_ttl"] <= 86400:
        module.fail_json(msg="enrollment_token_ttl must be within 60..86400 seconds")


def current(client, avm_id, cvms):
    """(C-VM -> bound A-VM or None, {(scope, subject, kind): digest})."""
    _s, avm = client.request("GET", "/v1/avms/%s" % avm_id)
    refs = dict((("avm", avm_id, k), d) for k, d in avm["references"].items())
    bound = {}
    for cvm in cvms:
        _s, info = client.request("GET", "/v1/cvms/%s" % cvm)
        bound[cvm] = info.get("avm")
        for kind, digest in (info.get("references") or {}).items():
            refs[("cvm", cvm, kind)] = digest
    return bound, refs


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            REMS_ARGUMENT_SPEC,
            avm_id=dict(type="str", required=True),
            cvms=dict(type="list", elements="str", default=[]),
            move=dict(type="bool", default=False),
            references=dict(type="list", elements="dict", default=[], options=dict(
                kind=dict(type="str", required=True, choices=list(AVM_KINDS) + [
                    "profile", "baseline", "local-policy"]),
                subject=dict(type="str", required=True),
                digest=dict(type="str", required=True),
                scope=dict(type="str", choices=["avm", "cvm"]),
            )),
            enrollment_token=dict(type="bool", default=False, no_log=False),
            enrollment_token_ttl=dict(type="int", default=900, no_log=False),
        ),
        mutually_exclusive=REMS_MUTUALLY_EXCLUSIVE,
        required_one_of=[("token", "token_file")],
        supports_check_mode=True,
    )
    validate(module)
    p = module.params
    client = RemsClient.from_module(module)
    result = dict(changed=False, bound=[], references_changed=[])
    try:
        ref_cvms = [r["subject"] for r in p["references"] if _scope(r) == "cvm"]
        bound, refs = current(client, p["avm_id"], sorted(set(p["cvms"]) | set(ref_cvms)))
        to_bind = [c for c in p["cvms"] if bound.get(c) != p["avm_id"]]
        foreign = [c for c in to_bind if bound.get(c) and not p["move"]]
        if foreign:
            module.fail_json(msg="C-VMs bound to another A-VM: %s (move them with move=true)"
                             % ", ".join("%s (%s)" % (c, bound[c]) for c in foreign))
        to_approve = [r for r in p["references"]
                      if refs.get((_scope(r), r["subject"], r["kind"])) != r["digest"]]
        result["bound"] = to_bind
        result["references_changed"] = ["%s:%s" % (r["kind"], r["subject"]) for r in to_approve]
        result["changed"] = bool(to_bind or to_approve)
        if module._diff:
            before_refs = dict(("%s:%s" % (k[2], k[1]), v) for k, v in refs.items())
            after_refs = dict(before_refs)
            after_refs.update(("%s:%s" % (r["kind"], r["subject"]), r["digest"])
                              for r in p["references"])
            result["diff"] = dict(
                before=dict(bindings=dict((c, bound.get(c)) for c in p["cvms"]),
                            references=before_refs),
                after=dict(bindings=dict((c, p["avm_id"]) for c in p["cvms"]),
                           references=after_refs))
        if module.check_mode:
            module.exit_json(**result)
        for cvm in to_bind:
            client.request("PUT", "/v1/cvms/%s/avm" % cvm,
                           {"avm": p["avm_id"], "move": p["move"]})
        for r in to_approve:
            client.request("PUT", "/v1/%ss/%s/references/%s" % (_scope(r), r["subject"],
                                                                r["kind"]),
                           {"digest": r["digest"]})
        if p["enrollment_token"]:
            _s, token = client.request("POST", "/v1/tokens", {
                "scope": "enroll", "avm": p["avm_id"], "ttl_s": p["enrollment_token_ttl"],
                "note": "enrollment of %s" % p["avm_id"]})
            result["enrollment_token"] = token["token"]
            result["changed"] = True
    except RemsError as exc:
        module.fail_json(msg=str(exc), http_status=exc.status)
    except (KeyError, TypeError) as exc:
        module.fail_json(msg="unexpected REM-S answer: missing %s" % exc)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
