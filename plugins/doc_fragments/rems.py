# -*- coding: utf-8 -*-
# Copyright: VIMS developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


class ModuleDocFragment(object):
    # Options of every module that talks to the REM-S HTTP API.
    DOCUMENTATION = r"""
options:
  rems_url:
    description:
      - Base URL of the REM-S HTTP API, scheme, host and port without a path,
        for example V(https://rems.example.org:8080). The REM-S serves its API over
        TLS with the REM-S CA's certificate (give O(ca_path)); plain V(http://) only
        on its loopback gate listener.
    type: str
    required: true
  token:
    description:
      - A REM-S bearer token of the scope the task needs (operator for writes and
        on-demand attestation; read for reports, policies and verdicts).
      - Mutually exclusive with O(token_file).
    type: str
  token_file:
    description:
      - File on the managed host holding the REM-S bearer token.
      - Mutually exclusive with O(token).
    type: path
  validate_certs:
    description:
      - Verify the REM-S TLS certificate when O(rems_url) is C(https).
    type: bool
    default: true
  ca_path:
    description:
      - CA bundle to verify the REM-S TLS certificate with (the REM-S CA,
        C(ca.pem) in the rems role's PKI directory).
    type: path
  http_timeout:
    description:
      - Seconds to wait for the REM-S to answer one HTTP request.
    type: int
    default: 10
"""
