"""Thin asyncio adapter: pumps bytes between a TLS stream and a sans-IO connection.

All protocol decisions stay in :mod:`vims.protocol.core`; this module only
reads, writes, runs the core's timer and, on the REM-S, takes the A-VM's
identity from its verified client certificate (the core then refuses a hello
that names another A-VM).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable

from vims.protocol.core import AvmConnection, RemsConnection
from vims.protocol.events import Event
from vims.protocol.pki import peer_avm_id

__all__ = ["EventHandler", "Session", "channel_binding", "connect", "serve"]

READ_CHUNK = 64 * 1024

EventHandler = Callable[["Session", Event], None]
"""Called for every event, in order, from the session's task; must not block."""


class Session:
    """One connection: a stream pair, a core connection and the task pumping them."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: AvmConnection | RemsConnection,
        on_event: EventHandler | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.conn = conn
        self._reader = reader
        self._writer = writer
        self._on_event = on_event
        self._clock = clock
        self._wake = asyncio.Event()
        #: Events when no handler was given; unbounded, so only for short-lived use.
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._done = asyncio.Event()

    def now(self) -> float:
        return self._clock()

    def send_report(self, cvm: str, body: dict[str, object],
                    request_id: str | None = None) -> None:
        """A-VM: queue a report (see :meth:`AvmConnection.send_report`) and flush."""
        if not isinstance(self.conn, AvmConnection):
            raise TypeError("only an A-VM session sends reports")
        self.conn.send_report(cvm, body, self.now(), request_id)
        self._wake.set()

    def request_round(self, cvm: str) -> str:
        """REM-S: ask for a fresh round (see :meth:`RemsConnection.request_round`)."""
        if not isinstance(self.conn, RemsConnection):
            raise TypeError("only a REM-S session requests rounds")
        request_id = self.conn.request_round(cvm, self.now())
        self._wake.set()
        return request_id

    def poke(self) -> None:
        """Flush after the application called the core directly (e.g. update_policy)."""
        self._wake.set()

    def close(self, reason: str = "") -> None:
        self.conn.close(self.now(), reason)
        self._wake.set()

    async def wait_closed(self) -> None:
        await self._done.wait()

    async def next_event(self, timeout: float = 10.0) -> Event:
        """The next queued event (sessions without an ``on_event`` handler)."""
        return await asyncio.wait_for(self.events.get(), timeout)

    def _deliver(self) -> None:
        for event in self.conn.events():
            if self._on_event is not None:
                self._on_event(self, event)
            else:
                self.events.put_nowait(event)

    async def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self._writer.write(data)
            await self._writer.drain()

    async def run(self) -> None:
        """Pump until the core is CLOSED or the stream ends; always closes the stream."""
        read: asyncio.Task[bytes] | None = None
        try:
            while True:
                self._deliver()
                await self._flush()
                if self.conn.closed:
                    break
                if read is None:
                    read = asyncio.ensure_future(self._reader.read(READ_CHUNK))
                wake = asyncio.ensure_future(self._wake.wait())
                deadline = self.conn.get_timer()
                timeout = None if deadline is None else max(0.0, deadline - self.now())
                done, _ = await asyncio.wait(
                    {read, wake}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                wake.cancel()
                self._wake.clear()
                if read in done:
                    data = read.result()
                    read = None
                    if not data:
                        self.conn.connection_lost(self.now(), "peer closed the stream")
                        continue
                    self.conn.receive_data(data, self.now())
                timer = self.conn.get_timer()
                if timer is not None and self.now() >= timer:
                    self.conn.handle_timer(self.now())
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            self.conn.connection_lost(self.now(), f"{type(exc).__name__}: {exc}")
            self._deliver()
        finally:
            if read is not None:
                read.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await read
            self._deliver()
            self._writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await self._writer.wait_closed()
            self._done.set()


def channel_binding(writer: asyncio.StreamWriter) -> bytes:
    """The TLS channel binding of a connection, identical on both ends.

    Python's ssl module exposes no RFC 5705/9266 exporter, only ``tls-unique``:
    under TLS 1.3 that is the handshake's first Finished message, a MAC over the
    whole transcript (both randoms, the key shares), so it is unique to this
    connection and two TLS connections spliced together by a relay never share
    it. The control channel is TLS 1.3 only (see pki.py).
    """
    ssl_object = writer.get_extra_info("ssl_object")
    binding = ssl_object.get_channel_binding("tls-unique") if ssl_object is not None else None
    if not binding:
        raise ssl.SSLError("the TLS connection offers no channel binding")
    return bytes(binding)


async def serve(
    host: str,
    port: int,
    ssl_ctx: ssl.SSLContext,
    make_connection: Callable[[str, float], RemsConnection],
    on_event: EventHandler | None = None,
    *,
    max_connections: int = 4096,
    handshake_timeout_s: float = 10.0,
) -> asyncio.Server:
    """Start the REM-S listener; ``make_connection(peer_avm_id, now)`` builds each core.

    The avm_id comes from the verified client certificate; a connection whose
    core does not carry it as ``peer_avm_id`` is refused, so a misconfigured
    factory cannot switch the identity check off. Each core is bound to its TLS
    channel (:func:`channel_binding`) before it reads a byte. At most
    ``max_connections`` sessions run at once (more are closed at once), and a
    TLS handshake must complete within ``handshake_timeout_s``.
    """
    live: set[asyncio.StreamWriter] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(live) >= max_connections:
            writer.transport.abort()
            return
        live.add(writer)
        try:
            await _handle(reader, writer)
        finally:
            live.discard(writer)

    async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        avm_id = peer_avm_id(writer.get_extra_info("peercert"))
        try:
            binding = channel_binding(writer)
        except ssl.SSLError:
            binding = b""
        if avm_id is None or not binding:
            writer.close()
            return
        conn = make_connection(avm_id, time.monotonic())
        if conn.peer_avm_id != avm_id:
            writer.close()
            raise RuntimeError("make_connection must set peer_avm_id from its argument")
        conn.bind_channel(binding)
        session = Session(reader, writer, conn, on_event)
        await session.run()

    return await asyncio.start_server(handle, host, port, ssl=ssl_ctx,
                                      ssl_handshake_timeout=handshake_timeout_s)


async def connect(
    host: str,
    port: int,
    ssl_ctx: ssl.SSLContext,
    conn: AvmConnection,
    on_event: EventHandler | None = None,
    server_hostname: str | None = None,
) -> tuple[Session, asyncio.Task[None]]:
    """Open the A-VM's channel, send the hello and start pumping in a task."""
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ssl_ctx, server_hostname=server_hostname or host
    )
    try:
        conn.bind_channel(channel_binding(writer))
    except ssl.SSLError:
        writer.close()
        raise
    session = Session(reader, writer, conn, on_event)
    conn.connect(session.now())
    task = asyncio.create_task(session.run())
    return session, task
