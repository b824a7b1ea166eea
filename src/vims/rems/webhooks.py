"""Signed webhook notifications from the REM-S, and their verification by a receiver.

When a C-VM's trust changes (revoked, stale, restored), the REM-S POSTs a short
JWT to every configured URL (``Content-Type: application/jwt``)::

    header  {"alg": "ES256", "typ": "vims-webhook+jwt", "kid": "<REM-S key id>"}
    claims  {"iss": "<REM-S>", "aud": "<this URL>", "iat": ..., "exp": iat + 300,
             "jti": "<random, unique>", "toe": <time of the event>,
             "event": "revoked", "cvm": "cvm1", "status": "contraindicated",
             "reason": "kernel.syscall_table failed"}

Why a JWS with the REM-S's own EAR key rather than an HMAC over the body: the
receivers are relying parties that already trust the REM-S's published JWK set
(``/.well-known/jwks.json``) for EARs, so they verify a notification with what
they have, and there is no per-receiver shared secret to provision, store on
both sides and rotate. A shared secret would also let every receiver forge
notifications to the others; a signature lets nobody but the REM-S speak. The
``typ`` header keeps a notification from passing for an EAR (or the reverse),
``aud`` keeps one receiver from replaying what it got to another, ``jti`` with
a replay cache and the short ``exp`` keep an eavesdropper from replaying it to
the same one.

Delivery (:class:`WebhookSender`): :meth:`~WebhookSender.notify` only enqueues;
each URL has its own bounded queue and worker, so a dead or slow receiver never
delays another's notifications and never blocks the event loop. A delivery is
retried on connection errors, timeouts, 5xx, 408 and 429, with exponential
backoff and jitter; any other answer is final (a receiver that refuses the token
will refuse it again). Every final failure is counted and logged once, as one
line. A full queue drops its oldest notification, counted and logged (at most
every few seconds). Receivers: :func:`verify_webhook` and a :class:`ReplayCache`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from vims.rems import jws

log = logging.getLogger(__name__)

WEBHOOK_TYP = "vims-webhook+jwt"
MEDIA_TYPE = "application/jwt"
TOKEN_TTL_S = 300
RETRY_STATUSES = frozenset({408, 429})  # besides every 5xx: "try again later" answers
DROP_LOG_EVERY_S = 10.0


class WebhookError(jwt.InvalidTokenError):
    """A receiver refuses a notification (besides the JWT errors PyJWT raises)."""


class WebhookReplay(WebhookError):
    """This notification (its ``jti``) was accepted before.

    A receiver may answer it with a 2xx anyway: the REM-S retries a delivery whose
    answer it did not get with the same token, and the first one did arrive.
    """


class WebhookTarget(Protocol):
    """A receiver: its URL and how long one attempt may take (``config.Webhook``)."""

    @property
    def url(self) -> str: ...

    @property
    def timeout_s(self) -> float: ...


@dataclass(frozen=True)
class Target:
    url: str
    timeout_s: float = 2.0


@dataclass(frozen=True)
class _Event:
    event: str
    cvm: str
    status: str
    reason: str
    time: float


@dataclass
class _Counters:
    sent: int = 0
    retried: int = 0
    failed: int = 0
    dropped: int = 0


class _Lane:
    """One receiver's queue, worker and counters."""

    def __init__(self, target: WebhookTarget, queue_size: int) -> None:
        self.url = target.url
        self.timeout_s = float(target.timeout_s)
        self.queue: asyncio.Queue[_Event] = asyncio.Queue(queue_size)
        self.counters = _Counters()
        self.inflight: _Event | None = None
        self.task: asyncio.Task[None] | None = None
        self.last_drop_log = -DROP_LOG_EVERY_S


def sign_notification(key: ec.EllipticCurvePrivateKey, issuer: str, event: str, cvm: str,
                      status: str, reason: str, *, audience: str | None = None,
                      now: float | None = None, toe: float | None = None,
                      ttl_s: int = TOKEN_TTL_S) -> str:
    """One notification as a compact JWS (see the module docstring for its claims)."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"iss": issuer, "iat": issued, "exp": issued + ttl_s,
                              "jti": secrets.token_urlsafe(18),
                              "toe": round(issued if toe is None else toe, 3),
                              "event": event, "cvm": cvm, "status": status, "reason": reason}
    if audience is not None:
        claims["aud"] = audience
    return jws.sign(claims, key, WEBHOOK_TYP)


class WebhookSender:
    """Delivers notifications to every target; owned and closed by the REM-S server.

    ``targets`` have ``url`` and ``timeout_s`` (per attempt); a delivery makes at
    most ``max_attempts`` attempts, waiting ``backoff_s`` doubled each time, at
    most ``backoff_max_s``, with jitter (half to all of it). Each URL keeps at
    most ``queue_size`` notifications waiting. Use it from the event loop;
    :meth:`notify` may also be called from other threads once :meth:`start` ran.
    """

    def __init__(self, targets: Sequence[WebhookTarget], key: ec.EllipticCurvePrivateKey,
                 issuer: str, *, max_attempts: int = 5, backoff_s: float = 0.5,
                 backoff_max_s: float = 8.0, queue_size: int = 1000,
                 token_ttl_s: int = TOKEN_TTL_S, client: httpx.AsyncClient | None = None,
                 jitter: Callable[[], float] = random.random) -> None:
        if max_attempts < 1 or queue_size < 1:
            raise ValueError("max_attempts and queue_size must be at least 1")
        urls = [t.url for t in targets]
        if len(set(urls)) != len(urls):
            raise ValueError("a webhook URL is configured twice")
        self._key = key
        self._issuer = issuer
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self._queue_size = queue_size
        self._ttl_s = token_ttl_s
        self._jitter = jitter
        self._targets = list(targets)
        self._lanes: list[_Lane] = []
        self._client = client
        self._own_client = client is None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # ---------------------------------------------------------------- producer
    def start(self) -> None:
        """Start the workers on the running event loop (:meth:`notify` does it too)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False)
        self._lanes = [_Lane(t, self._queue_size) for t in self._targets]
        for lane in self._lanes:
            lane.task = self._loop.create_task(self._work(lane), name=f"webhook {lane.url}")

    def notify(self, event: str, cvm: str, status: str, reason: str) -> None:
        """Queue a notification for every target; returns at once, never blocks."""
        item = _Event(event, cvm, status, reason, time.time())
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is not None and running is not self._loop:
            try:  # from another thread (the REM-S writer): the loop enqueues it
                self._loop.call_soon_threadsafe(self._enqueue, item)
            except RuntimeError:  # the loop has closed: the server is gone
                log.warning("webhook notification %s for %s after shutdown: not sent",
                            event, cvm)
            return
        if running is None:
            raise RuntimeError("WebhookSender.notify: no event loop (call start() in it)")
        self.start()
        self._enqueue(item)

    def _enqueue(self, item: _Event) -> None:
        if self._closed:
            log.warning("webhook notification %s for %s after shutdown: not sent",
                        item.event, item.cvm)
            return
        for lane in self._lanes:
            if lane.queue.full():
                lane.queue.get_nowait()  # the oldest goes: newer news matters more
                lane.queue.task_done()
                lane.counters.dropped += 1
                now = time.monotonic()
                if now - lane.last_drop_log >= DROP_LOG_EVERY_S:
                    lane.last_drop_log = now
                    log.warning("webhook %s: queue full (%d), oldest notification dropped "
                                "(%d dropped so far)", lane.url, self._queue_size,
                                lane.counters.dropped)
            lane.queue.put_nowait(item)

    # ---------------------------------------------------------------- delivery
    async def _work(self, lane: _Lane) -> None:
        while True:
            item = await lane.queue.get()
            lane.inflight = item
            try:
                await self._deliver(lane, item)
            except Exception:  # a bug must not stop this receiver's deliveries for good
                lane.counters.failed += 1
                log.exception("webhook %s: delivery of %s for %s crashed", lane.url,
                              item.event, item.cvm)
            finally:
                lane.inflight = None
                lane.queue.task_done()

    async def _deliver(self, lane: _Lane, item: _Event) -> None:
        assert self._client is not None
        # Signed once per delivery: a retry re-sends the same jti, so a receiver that
        # got an attempt whose answer was lost recognises the retry.
        token = sign_notification(self._key, self._issuer, item.event, item.cvm, item.status,
                                  item.reason, audience=lane.url, toe=item.time,
                                  ttl_s=self._ttl_s)
        why = ""
        for attempt in range(1, self._max_attempts + 1):
            retry = True
            try:
                async with self._client.stream(
                        "POST", lane.url, content=token, timeout=lane.timeout_s,
                        headers={"Content-Type": MEDIA_TYPE}) as response:
                    code = response.status_code
            except httpx.TransportError as exc:
                why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                why, retry = f"{type(exc).__name__}: {exc}", False
            else:
                if 200 <= code < 300:
                    lane.counters.sent += 1
                    return
                why = f"HTTP {code}"
                retry = code >= 500 or code in RETRY_STATUSES
            if not retry or attempt == self._max_attempts:
                break
            lane.counters.retried += 1
            delay = min(self._backoff_max_s, self._backoff_s * 2 ** (attempt - 1))
            log.debug("webhook %s: attempt %d failed (%s), retrying in %.2fs", lane.url,
                      attempt, why, delay)
            await asyncio.sleep(delay * (0.5 + self._jitter() / 2))
        lane.counters.failed += 1
        log.warning("webhook %s: %s for %s (%s) not delivered after %d attempt%s: %s",
                    lane.url, item.event, item.cvm, item.status, attempt,
                    "" if attempt == 1 else "s", " ".join(why.split()))

    # ------------------------------------------------------------------ status
    def stats(self) -> dict[str, Any]:
        """Counters for a status or metrics endpoint: per URL sent, retried, failed,
        dropped (queue full) and queued now."""
        return {"queue_size": self._queue_size, "targets": {
            lane.url: {"sent": lane.counters.sent, "retried": lane.counters.retried,
                       "failed": lane.counters.failed, "dropped": lane.counters.dropped,
                       "queued": lane.queue.qsize()}
            for lane in self._lanes} if self._lanes else {
            t.url: {"sent": 0, "retried": 0, "failed": 0, "dropped": 0, "queued": 0}
            for t in self._targets}}

    async def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued, for at most ``timeout_s``; then stop.

        Whatever is still undelivered then is counted as failed and logged, one
        line per URL.
        """
        self._closed = True
        if self._lanes:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(lane.queue.join() for lane in self._lanes)), timeout_s)
            for lane in self._lanes:
                left = lane.queue.qsize() + (lane.inflight is not None)
                if left:
                    lane.counters.failed += left
                    log.warning("webhook %s: %d notification%s not delivered at shutdown",
                                lane.url, left, "" if left == 1 else "s")
                if lane.task is not None:
                    lane.task.cancel()
            await asyncio.gather(*(lane.task for lane in self._lanes if lane.task),
                                 return_exceptions=True)
        if self._own_client and self._client is not None:
            await self._client.aclose()


# ------------------------------------------------------------------ receivers
class ReplayCache:
    """The ``jti``s a receiver has accepted, each until its token could no longer pass.

    Bounded: at most ``max_entries`` ids are kept. An id is forgotten only once its
    token is too old to be accepted anyway, so forgetting it opens no replay; when
    the cache is full of live ids it refuses new tokens (fails closed) instead of
    evicting one. Thread-safe (receivers are often threaded HTTP servers).
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._until: dict[str, float] = {}
        self._expiry: list[tuple[float, str]] = []  # min-heap over _until
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._until)

    def add(self, jti: str, keep_until: float, now: float | None = None) -> bool:
        """Remember ``jti`` until ``keep_until``; False if it is already remembered."""
        now = time.time() if now is None else now
        with self._lock:
            while self._expiry and self._expiry[0][0] <= now:
                until, old = heapq.heappop(self._expiry)
                if self._until.get(old) == until:
                    del self._until[old]
            if jti in self._until:
                return False
            if len(self._until) >= self.max_entries:
                raise WebhookError(f"replay cache full ({self.max_entries} live ids): "
                                   "refusing rather than forgetting one")
            self._until[jti] = keep_until
            heapq.heappush(self._expiry, (keep_until, jti))
            return True


def verify_webhook(token: str, jwks: Mapping[str, Any], *, issuer: str, seen: ReplayCache,
                   max_age_s: float, audience: str | None = None,
                   leeway_s: float = 5.0) -> dict[str, Any]:
    """Verify a notification from the REM-S; its claims, or an exception.

    ``jwks`` is the REM-S's JWK set (``/.well-known/jwks.json``), ``issuer`` its
    identity, ``seen`` this receiver's replay cache, ``max_age_s`` how old (by
    ``iat``) a notification may be. Pass ``audience`` (this receiver's URL, as
    configured on the REM-S) to refuse notifications meant for another receiver.
    Raises :class:`WebhookReplay` for an accepted ``jti`` seen again,
    :class:`WebhookError` for other refusals of this module, and PyJWT's
    :class:`jwt.InvalidTokenError` subclasses for a bad signature, issuer,
    audience or expiry; all are :class:`jwt.InvalidTokenError`.
    """
    try:
        keys = jws.keys_from_jwks(jwks)
    except ValueError as exc:
        raise WebhookError(f"bad JWK set: {exc}") from exc
    claims = jws.decode(token, keys, typ=WEBHOOK_TYP, issuer=issuer, audience=audience,
                        require=("iss", "iat", "exp", "jti", "event", "cvm", "status"),
                        integer_times=("iat", "exp"), leeway_s=leeway_s)
    now = time.time()
    if now - claims["iat"] > max_age_s + leeway_s:
        raise WebhookError(f"notification too old ({now - claims['iat']:.0f}s > "
                           f"{max_age_s:.0f}s)")
    jti = claims["jti"]
    if not isinstance(jti, str) or not 16 <= len(jti) <= 128:
        raise WebhookError("jti must be a string of 16 to 128 characters")
    # After the signature: a forger cannot fill the cache. Kept until the token
    # fails on age or expiry by itself.
    keep_until = min(claims["exp"], claims["iat"] + max_age_s) + leeway_s
    if not seen.add(jti, keep_until, now):
        raise WebhookReplay(f"replayed notification (jti {jti})")
    return claims
