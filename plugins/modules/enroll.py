#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: VIMS developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: enroll
short_description: Enroll an A-VM's vTPM with the REM-S
version_added: 0.1.0
description:
  - Enrolls the A-VM described by O(config) with the REM-S over its HTTP API. The
    REM-S validates the TPM's EK certificate chain, binds the A-VM's attestation key
    (AK) to the EK with MakeCredential/ActivateCredential and stores the AK; only
    then does it trust quotes from this A-VM.
  - Idempotent. The REM-S reports whether it already had this AK for this A-VM.
  - Give it the single-use enrollment token M(vims.attestation.avm_registration) issues
    for this A-VM (O(token)), so the A-VM host never holds the operator token; the
    REM-S refuses the token for any other A-VM or any other request, and after use.
  - The same work as C(vims avm enroll).
author:
  - VIMS developers (@vims-dev)
extends_documentation_fragment:
  - vims.attestation.rems
  - vims.attestation.attributes
  - vims.attestation.attributes.RUNTIME
attributes:
  check_mode:
    support: partial
    details:
      - Whether an AK is enrolled can only be learnt by running the enrollment
        protocol, which writes; in check mode the module does nothing and reports
        no change (C(skipped)).
  diff_mode:
    support: none
options:
  config:
    description:
      - The A-VM agent's configuration file (TOML); it names the A-VM and its TPM.
    type: path
    required: true
seealso:
  - module: vims.attestation.attest
"""

EXAMPLES = r"""
- name: Enroll the A-VM
  vims.attestation.enroll:
    config: /etc/vims/avm.toml
    rems_url: https://rems.example.org:8080
    ca_path: /etc/vims/rems-ca.pem
    token: "{{ registration.enrollment_token }}"
  vars:
    ansible_python_interpreter: /opt/vims/venv/bin/python
"""

RETURN = r"""
avm_id:
  description: The A-VM's identity.
  returned: success
  type: str
  sample: avm1
ak_sha256:
  description: SHA-256 of the enrolled AK's public key.
  returned: success
  type: str
"""

import traceback

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vims.attestation.plugins.module_utils._rems import (
    REMS_ARGUMENT_SPEC,
    REMS_MUTUALLY_EXCLUSIVE,
    rems_token,
)
from ansible_collections.vims.attestation.plugins.module_utils._vims import require_vims


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(REMS_ARGUMENT_SPEC, config=dict(type="path", required=True)),
        mutually_exclusive=REMS_MUTUALLY_EXCLUSIVE,
        required_one_of=[("token", "token_file")],
        supports_check_mode=True,
    )
    if module.check_mode:
        module.exit_json(changed=False, skipped=True,
                         msg="enrollment is not run in check mode (it writes the REM-S)")
    require_vims(module)
    from pathlib import Path

    from vims.avm.config import load as load_avm_config
    from vims.errors import VimsError

    try:
        from vims.avm.enroll import enroll
    except ImportError:
        module.fail_json(msg="this VIMS runtime has no network enrollment (vims.avm.enroll); "
                             "upgrade the runtime")
    token = rems_token(module)
    try:
        ca = module.params.get("ca_path")
        res = enroll(load_avm_config(Path(module.params["config"])),
                     module.params["rems_url"], token, ca=Path(ca) if ca else None)
    except VimsError as exc:
        module.fail_json(msg=str(exc))
    except Exception as exc:  # pylint: disable=broad-except
        module.fail_json(msg="enrollment failed: %r" % exc, exception=traceback.format_exc())
    module.exit_json(changed=bool(res.changed), avm_id=res.avm_id, ak_sha256=res.ak_sha256)


if __name__ == "__main__":
    main()
