#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: VIMS developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: baseline
short_description: Build the known-good baseline of a C-VM
version_added: 0.1.0
description:
  - Builds a VIMS baseline for a C-VM, bound to its kernel's profile, from the golden
    image (text pages of every executable of an initramfs or root directory) and/or
    from a clean guest's memory (IDT, module sizes, normalized kernel text).
  - Idempotent by content. The baseline is built in memory and its SHA-256 compared
    with the file at O(dest); the file is replaced only when they differ.
  - The same work as C(vims baseline build).
  - With O(rems_url) and O(cvm), the baseline's SHA-256 is also approved at the REM-S as
    the C-VM's baseline; the A-VM measures the baseline file into PCR 23 and the REM-S
    believes it only with that digest. Approving needs an operator token.
author:
  - VIMS developers (@vims-dev)
extends_documentation_fragment:
  - vims.attestation.attributes
  - vims.attestation.attributes.RUNTIME
  - vims.attestation.libvmi
attributes:
  check_mode:
    support: full
    details:
      - The baseline is built (reading the guest) and compared, but not written.
  diff_mode:
    support: none
options:
  profile:
    description:
      - The OS profile of the C-VM's kernel.
    type: path
    required: true
  dest:
    description:
      - The baseline to write (JSON).
    type: path
    required: true
  initramfs:
    description:
      - The golden initramfs (cpio, optionally compressed). Mutually exclusive with O(rootfs).
    type: path
  rootfs:
    description:
      - The golden root directory. Mutually exclusive with O(initramfs).
    type: path
  memory:
    description:
      - RAM file of the clean, running C-VM (read while it is paused, when it is a lab C-VM).
      - Mutually exclusive with O(domain).
    type: path
  domain:
    description:
      - The clean, running C-VM as a live domain, read (paused) through LibVMI's O(mode) driver.
      - Mutually exclusive with O(memory).
    type: str
  cvm:
    description:
      - The C-VM this baseline is of; with O(rems_url), its approved baseline digest.
    type: str
  rems_url:
    description:
      - The REM-S HTTPS API to approve the baseline's digest at (see O(cvm)).
    type: str
  token:
    description:
      - An operator token of the REM-S. Mutually exclusive with O(token_file).
    type: str
  token_file:
    description:
      - File holding an operator token of the REM-S.
    type: path
  ca_path:
    description:
      - The REM-S CA, to verify its certificate.
    type: path
  validate_certs:
    description:
      - Verify the REM-S's TLS certificate.
    type: bool
    default: true
  http_timeout:
    description:
      - Seconds to wait for the REM-S to answer one HTTP request.
    type: int
    default: 10
notes:
  - Take the baseline from a C-VM known to be clean, right after a fresh boot.
seealso:
  - module: vims.attestation.profile
  - module: vims.attestation.vmi_check
"""

EXAMPLES = r"""
- name: Baseline of the lab C-VM, from its initramfs and its clean memory
  vims.attestation.baseline:
    profile: /var/lib/vims/cvm1/profile.json
    initramfs: /var/lib/vims/cvm1/initramfs.cpio.gz
    memory: /dev/shm/vims-cvm1.ram
    dest: /var/lib/vims/cvm1/baseline.json
  vars:
    ansible_python_interpreter: /opt/vims/venv/bin/python

- name: Baseline of a Xen C-VM domain, read from dom0 through LibVMI's Xen driver
  vims.attestation.baseline:
    profile: /var/lib/vims/cvm2/profile.json
    initramfs: /var/lib/vims/cvm2/initrd.img
    domain: cvm2
    dest: /var/lib/vims/cvm2/baseline.json
  vars:
    ansible_python_interpreter: /opt/vims/venv/bin/python
"""

RETURN = r"""
sha256:
  description: SHA-256 of the baseline as written (or as it would be written).
  returned: success
  type: str
executables:
  description: How many executables the baseline covers.
  returned: success
  type: int
  sample: 12
build_id:
  description: The build-id of the kernel the baseline is bound to.
  returned: success
  type: str
approved:
  description: Whether the REM-S's approved baseline digest of O(cvm) changed (or would).
  returned: when O(rems_url) is given
  type: bool
"""

import hashlib
import os
import traceback

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vims.attestation.plugins.module_utils._rems import (
    RemsClient,
    RemsError,
    approve_reference,
)
from ansible_collections.vims.attestation.plugins.module_utils._vims import require_vims


def build(params):
    """(the serialized baseline, its build-id, number of executables)."""
    import json
    from pathlib import Path

    from vims.baseline import clean_guest_state, load_image_files, new_baseline
    from vims.checks.cli import open_memory
    from vims.vmi.profile import Profile

    def path(key):
        return Path(params[key]) if params[key] else None

    profile = Profile.load(Path(params["profile"]))
    data = new_baseline(profile)
    data["executables"] = load_image_files(path("initramfs"), path("rootfs"))
    if params["memory"] or params["domain"]:
        with open_memory(profile, path("memory"), params["domain"], params["mode"]) as mem, \
                mem.paused():
            data.update(clean_guest_state(mem))
    # Byte for byte what vims.baseline.save writes, so hashes compare across both.
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    return text.encode("utf-8"), profile.build_id, len(data["executables"])


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            profile=dict(type="path", required=True),
            dest=dict(type="path", required=True),
            initramfs=dict(type="path"),
            rootfs=dict(type="path"),
            memory=dict(type="path"),
            domain=dict(type="str"),
            mode=dict(type="str", choices=["xen", "kvm"], default="xen"),
            cvm=dict(type="str"),
            rems_url=dict(type="str"),
            token=dict(type="str", no_log=True),
            token_file=dict(type="path"),
            ca_path=dict(type="path"),
            validate_certs=dict(type="bool", default=True),
            http_timeout=dict(type="int", default=10),
        ),
        mutually_exclusive=[("initramfs", "rootfs"), ("memory", "domain"),
                            ("token", "token_file")],
        required_one_of=[("initramfs", "rootfs", "memory", "domain")],
        required_together=[("rems_url", "cvm")],
        supports_check_mode=True,
    )
    p = module.params
    if p["rems_url"] and not (p["token"] or p["token_file"]):
        module.fail_json(msg="approving the baseline at the REM-S needs token or token_file")
    require_vims(module)
    from vims.errors import VimsError

    try:
        content, build_id, count = build(p)
    except VimsError as exc:
        module.fail_json(msg=str(exc))
    except Exception as exc:  # pylint: disable=broad-except
        module.fail_json(msg="baseline build failed: %r" % exc, exception=traceback.format_exc())
    digest = hashlib.sha256(content).hexdigest()
    try:
        with open(p["dest"], "rb") as f:
            current = hashlib.sha256(f.read()).hexdigest()
    except (IOError, OSError):
        current = None
    changed = current != digest
    if changed and not module.check_mode:
        tmp = p["dest"] + ".partial"
        with open(tmp, "wb") as f:
            f.write(content)
        module.atomic_move(tmp, p["dest"])
        os.chmod(p["dest"], 0o644)
    result = dict(changed=changed, sha256=digest, executables=count, build_id=build_id)
    if p["rems_url"]:
        try:
            result["approved"] = approve_reference(RemsClient.from_module(module), "baseline",
                                                   p["cvm"], digest, module.check_mode)
        except RemsError as exc:
            module.fail_json(msg=str(exc), http_status=exc.status, **result)
        result["changed"] = changed or result["approved"]
    module.exit_json(**result)


if __name__ == "__main__":
    main()
