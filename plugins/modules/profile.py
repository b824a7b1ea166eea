#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: VIMS developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: profile
short_description: Build the OS profile of the kernel a C-VM boots
version_added: 0.1.0
description:
  - Builds a VIMS OS profile (symbols and type layouts, from the kernel image's own
    BTF and kallsyms; no debug package, no running guest) and writes it to O(dest).
  - Idempotent by kernel identity. A profile records the SHA-256 and the build-id of
    the image it was built from; when O(dest) already holds the profile of this very
    image nothing is rebuilt (a rebuild takes tens of seconds).
  - The same work as C(vims profile build).
author:
  - VIMS developers (@vims-dev)
extends_documentation_fragment:
  - vims.attestation.attributes
  - vims.attestation.attributes.RUNTIME
attributes:
  check_mode:
    support: full
    details:
      - Reports whether the profile would be (re)built, without building it.
  diff_mode:
    support: none
options:
  kernel:
    description:
      - The bzImage (vmlinuz) the C-VM boots, or a vmlinux ELF.
    type: path
    required: true
  dest:
    description:
      - The profile to write (JSON).
    type: path
    required: true
  force:
    description:
      - Rebuild even when O(dest) is the profile of O(kernel).
    type: bool
    default: false
seealso:
  - module: vims.attestation.baseline
"""

EXAMPLES = r"""
- name: Profile of the C-VM's kernel
  vims.attestation.profile:
    kernel: /var/lib/vims/cvm1/vmlinuz
    dest: /var/lib/vims/cvm1/profile.json
  vars:
    ansible_python_interpreter: /opt/vims/venv/bin/python
"""

RETURN = r"""
build_id:
  description: The kernel's GNU build-id (from the existing profile when nothing was built,
    and null in check mode when the profile would be built).
  returned: success
  type: str
  sample: 4f5b3c1e0c9a8b7d6e5f4a3b2c1d0e9f8a7b6c5d
release:
  description: The kernel release the profile is for.
  returned: success
  type: str
  sample: 6.1.0-56-amd64
kernel_sha256:
  description: SHA-256 of O(kernel).
  returned: success
  type: str
"""

import hashlib
import traceback

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.vims.attestation.plugins.module_utils._vims import require_vims


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def existing_profile(dest):
    """The profile at dest, or None when there is none or it is not a readable profile."""
    from pathlib import Path

    from vims.errors import VimsError
    from vims.vmi.profile import Profile

    try:
        return Profile.load(Path(dest))
    except VimsError:
        return None


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            kernel=dict(type="path", required=True),
            dest=dict(type="path", required=True),
            force=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    require_vims(module)
    from pathlib import Path

    from vims.errors import VimsError
    from vims.vmi.profile import Profile, analyze_kernel

    p = module.params
    try:
        kernel_sha256 = file_sha256(p["kernel"])
    except (IOError, OSError) as exc:
        module.fail_json(msg="cannot read kernel %s: %s" % (p["kernel"], exc))
    old = existing_profile(p["dest"])
    if old is not None and old.kernel_sha256 == kernel_sha256 and not p["force"]:
        module.exit_json(changed=False, build_id=old.build_id, release=old.release,
                         kernel_sha256=kernel_sha256)
    if module.check_mode:
        module.exit_json(changed=True, build_id=None, release=None, kernel_sha256=kernel_sha256)
    try:
        built = Profile.from_analysis(analyze_kernel(Path(p["kernel"])))
        built.save(Path(p["dest"]))
    except VimsError as exc:
        module.fail_json(msg=str(exc))
    except Exception as exc:  # pylint: disable=broad-except
        module.fail_json(msg="profile build failed: %r" % exc, exception=traceback.format_exc())
    module.exit_json(changed=True, build_id=built.build_id, release=built.release,
                     kernel_sha256=kernel_sha256)


if __name__ == "__main__":
    main()
