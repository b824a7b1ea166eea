# -*- coding: utf-8 -*-
# Copyright: VIMS developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


class ModuleDocFragment(object):
    # The LibVMI driver of every module that reads a live C-VM domain (O(domain)).
    DOCUMENTATION = r"""
options:
  mode:
    description:
      - LibVMI driver for O(domain).
    type: str
    choices: [xen, kvm]
    default: xen
"""
