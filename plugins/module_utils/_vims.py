# -*- coding: utf-8 -*-
# Copyright: VIMS developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Import guard for the VIMS runtime (the ``vims`` Python package).

The modules that read C-VM memory or build profiles, baselines and TPM keys
run *inside* the runtime: the task's interpreter must be the runtime venv's
Python (``ansible_python_interpreter: /opt/vims/venv/bin/python``; the avm role
sets it). Importing the runtime instead of shelling out to the ``vims`` CLI
gives typed errors (``VimsError``) and structured results without parsing, and
lets check mode stop exactly before a write.
"""

from __future__ import annotations

import traceback

from ansible.module_utils.basic import missing_required_lib

__all__ = ["HAS_VIMS", "VIMS_IMPORT_ERROR", "VIMS_LIB", "require_vims"]

VIMS_LIB = "vims (the VIMS runtime; run the task with the runtime venv's python)"
VIMS_URL = "https://example.invalid/vims/attestation#the-two-commands"

try:
    import vims  # noqa: F401  pylint: disable=unused-import
except ImportError:
    HAS_VIMS = False
    VIMS_IMPORT_ERROR = traceback.format_exc()
else:
    HAS_VIMS = True
    VIMS_IMPORT_ERROR = None


def require_vims(module):
    """Fail the task with Ansible's standard missing-library message."""
    if not HAS_VIMS:
        module.fail_json(msg=missing_required_lib(VIMS_LIB, url=VIMS_URL),
                         exception=VIMS_IMPORT_ERROR)
