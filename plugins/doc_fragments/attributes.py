# -*- coding: utf-8 -*-
# Copyright: VIMS developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


class ModuleDocFragment(object):
    # Standard attribute descriptions; each module states its own support.
    DOCUMENTATION = r"""
options: {}
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
"""

    # For modules that read only: full work in check mode, nothing to diff.
    READ_ONLY = r"""
options: {}
attributes:
  check_mode:
    support: full
    details:
      - This module changes nothing, so it does its full work in check mode.
  diff_mode:
    support: N/A
    details:
      - This module changes nothing.
"""

    # For modules that need the VIMS runtime on the managed host.
    RUNTIME = r"""
options: {}
requirements:
  - The VIMS runtime (Python package C(vims)) importable by the task's interpreter;
    set C(ansible_python_interpreter) to the runtime venv's Python
    (the P(vims.attestation.avm#role) role installs it and sets C(avm_python)).
"""
