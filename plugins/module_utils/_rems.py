# -*- coding: utf-8 -*-
# Copyright: VIMS developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""HTTP client for the REM-S API, shared by the attest and policy modules.

Only ansible-core's own ``open_url`` is used, so these modules run on any
managed host (or the controller) without the VIMS runtime.
"""

from __future__ import annotations

import json

from ansible.module_utils.common.text.converters import to_native, to_text
from ansible.module_utils.six.moves.urllib.error import HTTPError, URLError
from ansible.module_utils.urls import open_url

__all__ = ["AVM_KINDS", "REMS_ARGUMENT_SPEC", "RemsClient", "RemsError", "approve_reference",
           "rems_token"]

# What an A-VM measures of itself; every other kind is of a C-VM.
AVM_KINDS = ("agent-code", "agent-config")

# The REM-S answers are small JSON documents; a bigger body is not a REM-S.
MAX_BODY = 4 * 1024 * 1024

REMS_ARGUMENT_SPEC = dict(
    rems_url=dict(type="str", required=True),
    token=dict(type="str", no_log=True),
    token_file=dict(type="path"),
    validate_certs=dict(type="bool", default=True),
    ca_path=dict(type="path"),
    http_timeout=dict(type="int", default=10),
)

REMS_MUTUALLY_EXCLUSIVE = [("token", "token_file")]


class RemsError(Exception):
    """A REM-S request failed; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, msg, status=0, body=None):
        super(RemsError, self).__init__(msg)
        self.status = status
        self.body = body


def rems_token(module):
    """The admin bearer token from ``token`` or ``token_file`` (None when neither)."""
    params = module.params
    if params.get("token"):
        return params["token"]
    path = params.get("token_file")
    if not path:
        return None
    try:
        with open(path, "r") as f:
            token = f.read().strip()
    except (IOError, OSError) as exc:
        module.fail_json(msg="cannot read token_file %s: %s" % (path, to_native(exc)))
    if not token:
        module.fail_json(msg="token_file %s is empty" % path)
    return token


class RemsClient(object):
    """JSON over HTTP(S) to one REM-S."""

    def __init__(self, url, token=None, validate_certs=True, ca_path=None, timeout=10):
        self.url = url.rstrip("/")
        self.token = token
        self.validate_certs = validate_certs
        self.ca_path = ca_path
        self.timeout = timeout

    @classmethod
    def from_module(cls, module):
        p = module.params
        url = p["rems_url"]
        if not (url.startswith("http://") or url.startswith("https://")):
            module.fail_json(msg="rems_url must start with http:// or https://, got %r" % url)
        return cls(url, rems_token(module), p["validate_certs"], p.get("ca_path"),
                   p["http_timeout"])

    def request(self, method, path, body=None, timeout=None, auth=True):
        """Returns (status, decoded JSON or None). Raises RemsError on transport failures
        and on non-2xx statuses, with the REM-S's ``detail`` when it gave one."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if auth and self.token:
            headers["Authorization"] = "Bearer %s" % self.token
        try:
            resp = open_url(self.url + path, data=data, headers=headers, method=method,
                            validate_certs=self.validate_certs, ca_path=self.ca_path,
                            timeout=timeout or self.timeout, follow_redirects="none")
            status = resp.getcode()
            raw = resp.read(MAX_BODY + 1)
        except HTTPError as exc:
            raw = exc.read(MAX_BODY + 1) if exc.fp is not None else b""
            raise RemsError("%s %s: HTTP %d %s" % (method, path, exc.code, _detail(raw)),
                            status=exc.code, body=_json(raw))
        except (URLError, OSError, ValueError) as exc:
            raise RemsError("%s %s: REM-S at %s unreachable: %s"
                            % (method, path, self.url, to_native(getattr(exc, "reason", exc))))
        if len(raw) > MAX_BODY:
            raise RemsError("%s %s: answer larger than %d bytes" % (method, path, MAX_BODY))
        return status, _json(raw)


def approve_reference(client, kind, subject, digest, check_mode=False):
    """Make *digest* the approved one for (kind, subject) at the REM-S; returns whether
    it changed (or would, in check mode)."""
    scope = "avm" if kind in AVM_KINDS else "cvm"
    _status, info = client.request("GET", "/v1/%ss/%s" % (scope, subject))
    if (info.get("references") or {}).get(kind) == digest:
        return False
    if not check_mode:
        client.request("PUT", "/v1/%ss/%s/references/%s" % (scope, subject, kind),
                       {"digest": digest})
    return True


def _json(raw):
    if not raw:
        return None
    try:
        return json.loads(to_text(raw, errors="surrogate_or_strict"))
    except ValueError:
        return None


def _detail(raw):
    data = _json(raw)
    if isinstance(data, dict) and "detail" in data:
        return to_native(data["detail"])[:300]
    return " ".join(to_native(raw[:300], errors="surrogate_or_replace").split())
