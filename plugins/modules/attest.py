#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: VIMS developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: attest
short_description: Attest a C-VM on demand through the REM-S
version_added: 0.1.0
description:
  - Asks the REM-S for a fresh attestation round of one C-VM with C(POST /v1/attest/CVM).
    The REM-S has the A-VM guarding it introspect the C-VM now, with a new nonce,
    a fresh report and a fresh vTPM quote, appraises the evidence and answers with
    the verdict, its trust vector and the EAR.
  - A round only reads the C-VM and adds a report to the REM-S's history, so the
    module does its full work in check mode; this is what gates plays.
  - Needs only ansible-core on the host it runs on (often the controller, with
    C(delegate_to) or C(connection=local)), not the VIMS runtime.
author:
  - VIMS developers (@vims-dev)
extends_documentation_fragment:
  - vims.attestation.rems
  - vims.attestation.attributes
  - vims.attestation.attributes.READ_ONLY
options:
  cvm:
    description:
      - The C-VM's name as the REM-S knows it.
    type: str
    required: true
  timeout:
    description:
      - Seconds the REM-S waits for the A-VM's fresh report before it answers 504.
    type: int
    default: 30
  fail_on_untrusted:
    description:
      - Fail the task when the C-VM is not trusted.
      - When false the task succeeds and RV(trusted) says what the REM-S decided.
    type: bool
    default: true
  nonce:
    description:
      - The relying party's nonce (base64url, 8 to 64 bytes). The REM-S echoes it as
        C(eat_nonce) in RV(ear), binding the answer to this request.
    type: str
seealso:
  - module: vims.attestation.vmi_check
  - module: vims.attestation.policy
"""

EXAMPLES = r"""
- name: Attest cvm1 and stop the play for this host if it is not trusted
  vims.attestation.attest:
    rems_url: http://rems.example.org:8080
    token_file: /etc/vims/admin.token
    cvm: cvm1

- name: Attest without failing; sort hosts into groups
  vims.attestation.attest:
    rems_url: "{{ rems_url }}"
    token: "{{ rems_admin_token }}"
    cvm: "{{ inventory_hostname }}"
    fail_on_untrusted: false
  delegate_to: localhost
  register: verdict

- name: Untrusted C-VMs join the group untrusted
  ansible.builtin.group_by:
    key: "{{ 'trusted' if verdict.trusted else 'untrusted' }}"
"""

RETURN = r"""
trusted:
  description: Whether the REM-S lets the C-VM through its gates.
  returned: success
  type: bool
  sample: true
status:
  description: The EAR status (AR4SI tier of the worst claim).
  returned: success
  type: str
  sample: affirming
reason:
  description: The REM-S's reason for its decision.
  returned: success
  type: str
vector:
  description: The AR4SI trust vector, claim name to tier value.
  returned: success
  type: dict
  sample: {executables: 2, configuration: 2, hardware: 2}
checks:
  description:
    - Each check of the C-VM's policy with its status now (pass, fail, stale, error,
      not_applicable); C(avm.evidence) is the A-VM's own attestation.
    - The C-VM is judged over all of them, not over the fresh report alone.
  returned: success
  type: dict
  sample: {kernel.text: pass, kernel.syscall_table: fail, avm.evidence: pass}
insecure_lab:
  description: The REM-S trusts A-VMs without golden values (a lab, never production).
  returned: success
  type: bool
ear:
  description: The signed EAR (JWT, ES256), or null when none was issued.
  returned: success
  type: str
claims:
  description: The EAR's claims as the REM-S decoded them.
  returned: success
  type: dict
report:
  description: The fresh report's sequence number, result and findings.
  returned: success
  type: dict
  sample: {seq: 12, result: pass, findings: []}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vims.attestation.plugins.module_utils._rems import (
    REMS_ARGUMENT_SPEC,
    REMS_MUTUALLY_EXCLUSIVE,
    RemsClient,
    RemsError,
)

# What each REM-S refusal means for the operator, in one line.
STATUS_MEANING = {
    401: "the REM-S refused the token",
    403: "this token's scope cannot attest (it needs an operator token)",
    404: "the REM-S does not know this C-VM",
    503: "no A-VM guarding this C-VM is connected to the REM-S",
    504: "the A-VM sent no fresh report in time",
}
FIELDS = ("cvm", "trusted", "status", "reason", "vector", "checks", "ear", "claims", "report",
          "insecure_lab")


def attest(client, cvm, timeout, nonce=None):
    """The REM-S's answer to one on-demand round (a dict with FIELDS)."""
    request = {"timeout_s": timeout}
    if nonce:
        request["nonce"] = nonce
    # The HTTP wait must outlast the REM-S's own wait for the A-VM.
    _status, body = client.request("POST", "/v1/attest/%s" % cvm, request,
                                   timeout=timeout + client.timeout)
    if not isinstance(body, dict) or not isinstance(body.get("trusted"), bool):
        raise RemsError("POST /v1/attest/%s: the REM-S answer is not an attestation result" % cvm)
    return dict((k, body.get(k)) for k in FIELDS)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            REMS_ARGUMENT_SPEC,
            cvm=dict(type="str", required=True),
            timeout=dict(type="int", default=30),
            fail_on_untrusted=dict(type="bool", default=True),
            nonce=dict(type="str"),
        ),
        mutually_exclusive=REMS_MUTUALLY_EXCLUSIVE,
        required_one_of=[("token", "token_file")],
        supports_check_mode=True,
    )
    p = module.params
    if not 1 <= p["timeout"] <= 600:
        module.fail_json(msg="timeout must be within 1..600 seconds")
    client = RemsClient.from_module(module)
    try:
        result = attest(client, p["cvm"], p["timeout"], p["nonce"])
    except RemsError as exc:
        meaning = STATUS_MEANING.get(exc.status)
        module.fail_json(msg="%s%s" % (exc, " (%s)" % meaning if meaning else ""),
                         http_status=exc.status)
    if p["fail_on_untrusted"] and not result["trusted"]:
        findings = (result.get("report") or {}).get("findings") or []
        detail = "; ".join("%s: %s" % (f.get("check"), f.get("summary")) for f in findings[:3])
        module.fail_json(msg="C-VM %s is not trusted: %s (%s)%s" % (
            p["cvm"], result["status"], result["reason"], "; " + detail if detail else ""),
            changed=False, **result)
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
