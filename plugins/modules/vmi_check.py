#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: VIMS developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: vmi_check
short_description: Run VIMS introspection checks on a C-VM from outside
version_added: 0.1.0
description:
  - Reads a C-VM's memory from the A-VM host (a RAM file or snapshot, or a live
    Xen/KVM domain through LibVMI), runs the VIMS integrity checks and returns
    the report (see C(docs/report.schema.json)).
  - The same work as C(vims check); it only reads, so it runs fully in check mode.
author:
  - VIMS developers (@vims-dev)
extends_documentation_fragment:
  - vims.attestation.attributes
  - vims.attestation.attributes.READ_ONLY
  - vims.attestation.attributes.RUNTIME
  - vims.attestation.libvmi
options:
  memory:
    description:
      - The C-VM's RAM file (the lab's C(/dev/shm/vims-NAME.ram)) or a raw snapshot.
      - Exactly one of O(memory) and O(domain) is required.
    type: path
  domain:
    description:
      - A live domain's name, read through LibVMI's O(mode) driver.
    type: str
  profile:
    description:
      - The OS profile of the kernel the C-VM runs (P(vims.attestation.profile#module)).
    type: path
    required: true
  baseline:
    description:
      - The known-good baseline (P(vims.attestation.baseline#module)); checks that
        need one report an error without it.
    type: path
  policy:
    description:
      - Local allowlists (modules, processes, credentials) as a JSON file.
    type: path
  checks:
    description:
      - Check ids to run, for example C(kernel.text); all of them when omitted.
    type: list
    elements: str
  consistency:
    description:
      - How a consistent view is obtained; C(auto) pauses the guest for the round
        when it can and otherwise re-reads until two rounds agree.
    type: str
    choices: [auto, pause, retry, none]
    default: auto
  fail_on_findings:
    description:
      - Fail the task when the round's result is not C(pass) (findings or errors).
      - When false the task succeeds and RV(result) says what was found.
    type: bool
    default: true
notes:
  - On Debian's Xen (built without XSM) only dom0 may map another domain's
    memory, so the task must run in dom0 for O(domain).
seealso:
  - module: vims.attestation.attest
  - module: vims.attestation.profile
  - module: vims.attestation.baseline
"""

EXAMPLES = r"""
- name: Check the lab C-VM
  vims.attestation.vmi_check:
    memory: /dev/shm/vims-cvm1.ram
    profile: /var/lib/vims/cvm1/profile.json
    baseline: /var/lib/vims/cvm1/baseline.json
    policy: /var/lib/vims/cvm1/policy.json
  vars:
    ansible_python_interpreter: /opt/vims/venv/bin/python
  register: cvm1_report

- name: Only the kernel checks on a Xen domain, without failing the play
  vims.attestation.vmi_check:
    domain: cvm1
    profile: /var/lib/vims/cvm1/profile.json
    checks: [kernel.text, kernel.syscall_table, kernel.idt]
    fail_on_findings: false
  register: kernel_report

- name: Show what failed
  ansible.builtin.debug:
    msg: "{{ kernel_report.report | vims.attestation.failed_checks }}"
"""

RETURN = r"""
result:
  description: The round's result.
  returned: always
  type: str
  sample: pass
failed_checks:
  description: Ids of the checks whose status is not C(pass).
  returned: always
  type: list
  elements: str
  sample: [kernel.syscall_table]
findings:
  description: The findings, each with C(check), C(severity), C(summary) and C(evidence).
  returned: always
  type: list
  elements: dict
  sample:
    - check: kernel.syscall_table
      severity: critical
      summary: "sys_call_table[39] (getpid) points to __x64_sys_read, not __x64_sys_getpid"
report:
  description: The whole report, as C(vims check --format json) prints it.
  returned: always
  type: dict
"""

import traceback

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vims.attestation.plugins.module_utils._vims import require_vims


def run_check(params):
    """The report of one round; raises vims.errors.VimsError on bad input."""
    from pathlib import Path

    from vims import baseline as baseline_mod
    from vims.checks.cli import load_json_arg, open_memory
    from vims.checks.runner import run_round, select_checks
    from vims.vmi.profile import Profile

    ids = select_checks(params["checks"] or None)
    profile = Profile.load(Path(params["profile"]))
    base = None
    if params["baseline"]:
        base = baseline_mod.load(Path(params["baseline"]))
        profile.check_matches(base["kernel"]["build_id"], base["kernel"]["release"])
    policy = load_json_arg(Path(params["policy"]) if params["policy"] else None, "policy")
    memory = Path(params["memory"]) if params["memory"] else None
    with open_memory(profile, memory, params["domain"], params["mode"]) as mem:
        target = {"memory": str(memory)} if memory else {"domain": params["domain"]}
        return run_round(mem, ids, base, policy, params["consistency"], target)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            memory=dict(type="path"),
            domain=dict(type="str"),
            mode=dict(type="str", choices=["xen", "kvm"], default="xen"),
            profile=dict(type="path", required=True),
            baseline=dict(type="path"),
            policy=dict(type="path"),
            checks=dict(type="list", elements="str"),
            consistency=dict(type="str", choices=["auto", "pause", "retry", "none"],
                             default="auto"),
            fail_on_findings=dict(type="bool", default=True),
        ),
        required_one_of=[("memory", "domain")],
        mutually_exclusive=[("memory", "domain")],
        supports_check_mode=True,
    )
    require_vims(module)
    from vims.errors import VimsError

    try:
        report = run_check(module.params)
    except VimsError as exc:
        module.fail_json(msg=str(exc))
    except Exception as exc:  # pylint: disable=broad-except
        # Guest memory is hostile input: any crash is reported, with its trace.
        module.fail_json(msg="introspection failed: %r" % exc, exception=traceback.format_exc())

    result = dict(
        changed=False,
        result=report["result"],
        failed_checks=[c["id"] for c in report["checks"] if c["status"] != "pass"],
        findings=report["findings"],
        report=report,
    )
    if module.params["fail_on_findings"] and report["result"] != "pass":
        summary = "; ".join("%s: %s" % (f["check"], f["summary"]) for f in report["findings"][:5])
        errors = [c["id"] for c in report["checks"] if c["status"] == "error"]
        module.fail_json(msg="C-VM integrity check %s: %s" % (
            report["result"], summary or "errors in " + ", ".join(errors)), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
