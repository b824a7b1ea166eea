"""Signed webhooks, delivered to real HTTP receivers on loopback.

Each receiver is a threaded ``http.server`` that does what an operator's endpoint
would: verify the body with ``verify_webhook`` against the REM-S JWK set, answer
204 on a new notification, 401 on a bad one, 409 on a replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from vims.rems import ear, jws
from vims.rems.webhooks import (
    ReplayCache,
    Target,
    WebhookError,
    WebhookReplay,
    WebhookSender,
    sign_notification,
    verify_webhook,
)

KEY = ec.generate_private_key(ec.SECP256R1())
OTHER = ec.generate_private_key(ec.SECP256R1())
ISSUER = "https://rems.lab.example:8080"
JWKS = ear.jwks(KEY.public_key())
FAST = {"backoff_s": 0.02, "backoff_max_s": 0.1}  # retries in tests take milliseconds


@dataclass
class Receiver:
    """What one webhook endpoint saw and how it behaves."""

    url: str = ""
    fail_next: int = 0  # answer 503 to this many requests first
    always_fail: bool = False
    requests: int = 0
    accepted: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    seen: ReplayCache = field(default_factory=lambda: ReplayCache(1000))
    got: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(rx: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
            with rx.lock:
                rx.requests += 1
                if rx.always_fail or rx.fail_next > 0:
                    rx.fail_next -= 1
                    self.send_response(503)
                    self.end_headers()
                    return
            try:
                if self.headers.get("Content-Type") != "application/jwt":
                    raise WebhookError("not application/jwt")
                claims = verify_webhook(body, JWKS, issuer=ISSUER, seen=rx.seen,
                                        max_age_s=60, audience=rx.url)
            except WebhookReplay as exc:
                code, why = 409, str(exc)
            except (WebhookError, jwt.InvalidTokenError) as exc:
                code, why = 401, str(exc)
            else:
                code, why = 204, ""
                with rx.lock:
                    rx.accepted.append(claims)
                    rx.tokens.append(body)
                rx.got.set()
            if why:
                with rx.lock:
                    rx.rejected.append(why)
            self.send_response(code)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    return Handler


@contextlib.contextmanager
def receiver(**kw: Any) -> Iterator[Receiver]:
    rx = Receiver(**kw)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(rx))
    rx.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield rx
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """A URL whose TCP connect succeeds but that never answers (a hung receiver)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    finally:
        sock.close()


def sender(*targets: Target, key: ec.EllipticCurvePrivateKey = KEY,
           **kw: Any) -> WebhookSender:
    return WebhookSender(list(targets), key, ISSUER, **{**FAST, **kw})


async def until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------- delivery
def test_a_signed_notification_is_accepted() -> None:
    async def run(rx: Receiver) -> WebhookSender:
        s = sender(Target(rx.url))
        s.notify("revoked", "cvm1", "contraindicated", "kernel.syscall_table failed")
        await until(lambda: rx.accepted)
        await s.close()
        return s

    with receiver() as rx:
        s = asyncio.run(run(rx))
    (claims,) = rx.accepted
    assert {k: claims[k] for k in ("iss", "event", "cvm", "status", "reason", "aud")} == {
        "iss": ISSUER, "event": "revoked", "cvm": "cvm1", "status": "contraindicated",
        "reason": "kernel.syscall_table failed", "aud": rx.url}
    assert 0 < claims["exp"] - claims["iat"] <= 300  # short-lived
    assert len(claims["jti"]) >= 22
    assert jwt.get_unverified_header(rx.tokens[0])["kid"] == ear.key_id(KEY.public_key())
    assert s.stats()["targets"][rx.url] == {
        "sent": 1, "retried": 0, "failed": 0, "dropped": 0, "queued": 0}


def test_notifications_are_delivered_in_order_with_unique_ids() -> None:
    async def run(rx: Receiver) -> None:
        s = sender(Target(rx.url))
        for i in range(5):
            s.notify("revoked", f"cvm{i}", "contraindicated", "r")
        await until(lambda: len(rx.accepted) == 5)
        await s.close()

    with receiver() as rx:
        asyncio.run(run(rx))
    assert [c["cvm"] for c in rx.accepted] == [f"cvm{i}" for i in range(5)]
    assert len({c["jti"] for c in rx.accepted}) == 5


def test_a_forged_notification_is_rejected() -> None:
    """Signed by another key, even one that claims the REM-S key id: refused, not retried."""
    async def run(rx: Receiver) -> tuple[WebhookSender, int]:
        s = sender(Target(rx.url), key=OTHER)  # an impostor REM-S
        s.notify("restored", "cvm1", "affirming", "all checks pass")
        await until(lambda: s.stats()["targets"][rx.url]["failed"] == 1)
        await s.close()
        now = int(time.time())
        forged = jws.sign({"iss": ISSUER, "iat": now, "exp": now + 60, "jti": "x" * 22,
                           "aud": rx.url, "event": "restored", "cvm": "cvm1",
                           "status": "affirming", "reason": "trust me"},
                          OTHER, typ="vims-webhook+jwt", kid=ear.key_id(KEY.public_key()))
        async with httpx.AsyncClient() as client:
            r = await client.post(rx.url, content=forged,
                                  headers={"Content-Type": "application/jwt"})
        return s, r.status_code

    with receiver() as rx:
        s, status = asyncio.run(run(rx))
    assert status == 401
    assert rx.accepted == []
    assert rx.requests == 2  # one from the impostor's sender (a 4xx is final), one forged
    assert "kid" in rx.rejected[0]
    assert "ignature" in rx.rejected[1]
    assert s.stats()["targets"][rx.url]["retried"] == 0


def test_a_replayed_notification_is_rejected() -> None:
    async def run(rx: Receiver) -> int:
        s = sender(Target(rx.url))
        s.notify("revoked", "cvm1", "contraindicated", "hook")
        await until(lambda: rx.accepted)
        await s.close()
        async with httpx.AsyncClient() as client:  # an eavesdropper re-posts the body
            again = await client.post(rx.url, content=rx.tokens[0],
                                      headers={"Content-Type": "application/jwt"})
        return again.status_code

    with receiver() as rx:
        assert asyncio.run(run(rx)) == 409
    assert len(rx.accepted) == 1
    assert "replay" in rx.rejected[0]


def test_a_notification_for_another_receiver_is_rejected() -> None:
    """Receiver A cannot pass on what it got to receiver B: the audience differs."""
    async def run(a: Receiver, b: Receiver) -> int:
        s = sender(Target(a.url))
        s.notify("revoked", "cvm1", "contraindicated", "hook")
        await until(lambda: a.accepted)
        await s.close()
        async with httpx.AsyncClient() as client:
            r = await client.post(b.url, content=a.tokens[0],
                                  headers={"Content-Type": "application/jwt"})
        return r.status_code

    with receiver() as a, receiver() as b:
        assert asyncio.run(run(a, b)) == 401
        assert b.accepted == []


def test_a_receiver_failing_twice_gets_it_on_the_third_try() -> None:
    async def run(rx: Receiver) -> WebhookSender:
        s = sender(Target(rx.url))
        s.notify("revoked", "cvm1", "contraindicated", "hook")
        await until(lambda: rx.accepted)
        await s.close()
        return s

    with receiver(fail_next=2) as rx:
        s = asyncio.run(run(rx))
    assert rx.requests == 3
    assert len(rx.accepted) == 1
    assert s.stats()["targets"][rx.url] == {
        "sent": 1, "retried": 2, "failed": 0, "dropped": 0, "queued": 0}


def test_a_receiver_that_always_fails_is_counted_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    async def run(rx: Receiver) -> WebhookSender:
        s = sender(Target(rx.url), max_attempts=4)
        s.notify("revoked", "cvm1", "contraindicated", "hook")
        await until(lambda: s.stats()["targets"][rx.url]["failed"] == 1)
        await s.close()
        return s

    with caplog.at_level(logging.DEBUG, logger="vims.rems.webhooks"), \
            receiver(always_fail=True) as rx:
        s = asyncio.run(run(rx))
    assert rx.requests == 4
    assert s.stats()["targets"][rx.url] == {
        "sent": 0, "retried": 3, "failed": 1, "dropped": 0, "queued": 0}
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    line = warnings[0].getMessage()
    assert "\n" not in line
    assert rx.url in line
    assert "503" in line
    assert "4 attempts" in line


def test_connection_errors_are_retried_then_counted() -> None:
    with socket.socket() as sock:  # a port that refuses connections
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"

    async def run() -> WebhookSender:
        s = sender(Target(dead), max_attempts=3)
        s.notify("revoked", "cvm1", "contraindicated", "hook")
        await until(lambda: s.stats()["targets"][dead]["failed"] == 1)
        await s.close()
        return s

    assert asyncio.run(run()).stats()["targets"][dead]["retried"] == 2


def test_a_dead_url_does_not_delay_another_urls_delivery() -> None:
    async def run(rx: Receiver, hole: str) -> float:
        s = sender(Target(hole, timeout_s=5.0), Target(rx.url))
        start = time.monotonic()
        s.notify("revoked", "cvm1", "contraindicated", "hook")
        await until(lambda: rx.accepted)
        took = time.monotonic() - start
        await s.close(timeout_s=0.2)
        return took

    with black_hole() as hole, receiver() as rx:
        assert asyncio.run(run(rx, hole)) < 1.0


def test_notify_never_blocks_and_a_full_queue_drops_the_oldest(
        caplog: pytest.LogCaptureFixture) -> None:
    took: list[float] = []
    stats: dict[str, int] = {}

    async def run(hole: str) -> None:
        s = sender(Target(hole, timeout_s=5.0), queue_size=3)
        start = time.monotonic()
        for i in range(50):
            s.notify("revoked", f"cvm{i}", "contraindicated", "hook")
        took.append(time.monotonic() - start)
        await asyncio.sleep(0.05)
        stats.update(s.stats()["targets"][hole])
        await s.close(timeout_s=0.1)

    with caplog.at_level(logging.WARNING, logger="vims.rems.webhooks"), black_hole() as hole:
        asyncio.run(run(hole))
    assert took[0] < 0.5  # 50 notifications, one ES256 signature each, no waiting
    # At most one in flight and three queued: the rest were dropped, oldest first.
    assert stats["dropped"] >= 46
    assert stats["queued"] <= 3
    drops = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert 1 <= len(drops) <= 3  # counted every time, logged without flooding


def test_close_drains_what_is_queued() -> None:
    async def run(rx: Receiver) -> None:
        s = sender(Target(rx.url))
        for i in range(3):
            s.notify("revoked", f"cvm{i}", "contraindicated", "hook")
        await s.close(timeout_s=5.0)

    with receiver() as rx:
        asyncio.run(run(rx))
        assert len(rx.accepted) == 3


def test_close_gives_up_on_a_hung_receiver_within_its_timeout() -> None:
    async def run(hole: str) -> tuple[float, dict[str, int]]:
        s = sender(Target(hole, timeout_s=10.0))
        s.notify("revoked", "cvm1", "contraindicated", "hook")
        s.notify("revoked", "cvm2", "contraindicated", "hook")
        await asyncio.sleep(0.05)
        start = time.monotonic()
        await s.close(timeout_s=0.3)
        return time.monotonic() - start, s.stats()["targets"][hole]

    with black_hole() as hole:
        took, stats = asyncio.run(run(hole))
    assert took < 2.0
    assert stats["failed"] == 2  # both undelivered, counted


def test_notify_from_another_thread_is_handed_to_the_loop() -> None:
    async def run(rx: Receiver) -> None:
        s = sender(Target(rx.url))
        s.start()
        await asyncio.to_thread(s.notify, "revoked", "cvm1", "contraindicated", "hook")
        await until(lambda: rx.accepted)
        await s.close()

    with receiver() as rx:
        asyncio.run(run(rx))


# ------------------------------------------------------------------ verify_webhook
def test_verify_webhook_refuses_old_expired_foreign_and_mistyped_tokens() -> None:
    now = time.time()
    seen = ReplayCache(100)

    def check(token: str, **kw: Any) -> dict[str, Any]:
        return verify_webhook(token, JWKS, issuer=ISSUER, seen=seen, max_age_s=30, **kw)

    ok = sign_notification(KEY, ISSUER, "revoked", "cvm1", "stale", "no report", now=now)
    assert check(ok)["status"] == "stale"
    with pytest.raises(WebhookReplay):
        check(ok)
    too_old = sign_notification(KEY, ISSUER, "revoked", "cvm1", "stale", "r", now=now - 60)
    with pytest.raises(WebhookError, match="old"):
        check(too_old)
    expired = sign_notification(KEY, ISSUER, "revoked", "cvm1", "stale", "r", now=now - 400)
    with pytest.raises(jwt.ExpiredSignatureError):
        check(expired)
    with pytest.raises(jwt.InvalidIssuerError):
        check(sign_notification(KEY, "https://evil.example", "revoked", "c", "s", "r"))
    _h, body, sig = sign_notification(OTHER, ISSUER, "revoked", "cvm1", "stale", "r").split(".")
    real_header = sign_notification(KEY, ISSUER, "revoked", "c", "s", "r").split(".")[0]
    with pytest.raises(jwt.InvalidSignatureError):  # the real kid over a forged signature
        check(f"{real_header}.{body}.{sig}")
    with pytest.raises(jwt.InvalidTokenError, match="kid"):
        check(sign_notification(OTHER, ISSUER, "revoked", "cvm1", "stale", "r"))
    # An EAR is signed with the same key: it is not a notification.
    token = ear.issue("cvm1", status="affirming", vector={"executables": 2},
                      policy_id="p", checks={}, key=KEY, iat=int(now), exp=int(now) + 30,
                      issuer=ISSUER)
    with pytest.raises(jwt.InvalidTokenError, match="typ"):
        check(token)
    aimed = sign_notification(KEY, ISSUER, "revoked", "c", "s", "r", audience="https://a/")
    with pytest.raises(jwt.InvalidAudienceError):
        check(aimed, audience="https://b/")
    # A forged token never reaches (or fills) the replay cache.
    assert len(seen) == 1


def test_the_replay_cache_is_bounded_and_fails_closed() -> None:
    cache = ReplayCache(2)
    now = 1000.0
    assert cache.add("a", now + 10, now)
    assert not cache.add("a", now + 10, now)
    assert cache.add("b", now + 20, now)
    with pytest.raises(WebhookError, match="full"):  # never forget a live id to make room
        cache.add("c", now + 20, now)
    assert cache.add("c", now + 20, now + 11)  # "a" has lapsed: its slot is free again
    assert len(cache) == 2


def test_jws_refuses_unknown_algorithms_before_any_crypto() -> None:
    with pytest.raises(jwt.InvalidAlgorithmError):
        jws.decode("eyJhbGciOiJSUzI1NiJ9.e30.AAAA", jws.keys_from_jwks(JWKS),
                   typ="vims-webhook+jwt")
