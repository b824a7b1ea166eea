"""A client of QEMU's gdbstub (the GDB remote serial protocol) for the tracer.

Written by hand on purpose: the maintained Python options drive a ``gdb``
binary (pygdbmi) or bring a whole analysis framework (avatar2), while the
tracer needs a handful of packets on its hot path (registers in one ``g``,
memory, breakpoints, continue) at a few hundred stops a second. The stub is
untrusted input like the guest: packets are bounded, checksums verified, every
wait has a deadline, and a broken stream raises ``GdbError`` in one line.

Facts of QEMU 7.2's stub this relies on (measured, see DESIGN.md): one client
at a time; connecting stops the VM; registers answer only after the client has
read ``target.xml``; once any client offered ``multiprocess+`` thread ids are
``p1.1``; a stop of the VM by anyone (QMP ``stop`` too) is reported to the
client as a stop reply.
"""

from __future__ import annotations

import re
import select
import socket
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from vims.errors import VimsError

MAX_PACKET = 1 << 20  # a `g` reply is ~1.2 kB; target.xml pieces a few kB
MAX_XML = 256 << 10
MAX_INCLUDES = 16
MAX_MEMORY_READ = 64 << 10
REPLY_TIMEOUT = 10.0
INTERRUPT = b"\x03"


_STOP = re.compile(rb"[TS][0-9a-fA-F]{2}")


class GdbError(VimsError):
    """The gdbstub refused a request, went away, or sent something malformed."""


@dataclass(frozen=True)
class Register:
    name: str
    number: int
    bits: int
    offset: int  # byte offset in the `g` reply


@dataclass(frozen=True)
class StopReply:
    """Why the VM stopped: a signal (5 = trap/breakpoint, 2 = interrupt) or its exit."""

    signal: int
    exited: bool = False
    raw: str = ""

    @property
    def trap(self) -> bool:
        return self.signal == 5 and not self.exited

    @property
    def thread(self) -> str | None:
        """The vCPU that stopped (``p1.2``), when the stub says."""
        found = re.search(r"thread:(p?[0-9a-fA-F]+(?:\.[0-9a-fA-F]+)?);", self.raw)
        return found.group(1) if found else None


def checksum(data: bytes) -> bytes:
    return b"%02x" % (sum(data) & 0xFF)


def escape(data: bytes) -> bytes:
    """Binary-escape ``#$}*`` as the protocol requires (``}`` then byte ^ 0x20)."""
    out = bytearray()
    for b in data:
        if b in b"#$}*":
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def decode_body(body: bytes) -> bytes:
    """Undo escapes and run-length encoding (``X*n`` repeats X n-29 more times)."""
    out = bytearray()
    i = 0
    while i < len(body):
        b = body[i]
        if b == 0x7D and i + 1 < len(body):
            out.append(body[i + 1] ^ 0x20)
            i += 2
        elif b == 0x2A and out and i + 1 < len(body):
            out += bytes((out[-1],)) * (body[i + 1] - 29)
            i += 2
        else:
            out.append(b)
            i += 1
        if len(out) > MAX_PACKET:
            raise GdbError("gdbstub packet larger than its bound")
    return bytes(out)


def parse_stop(reply: bytes) -> StopReply:
    text = reply.decode("ascii", "replace")
    if text[:1] in ("T", "S") and len(text) >= 3:
        try:
            return StopReply(int(text[1:3], 16), raw=text)
        except ValueError:
            pass
    if text[:1] in ("W", "X"):
        return StopReply(0, exited=True, raw=text)
    raise GdbError(f"gdbstub sent {text[:40]!r} where a stop reply was expected")


class Gdbstub:
    """One connection to a QEMU gdbstub (a Unix socket)."""

    def __init__(self, path: Path, timeout: float = REPLY_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            raise GdbError(f"cannot attach to the gdbstub at {path}: {exc.strerror or exc}"
                           " (is another tracer attached?)") from exc
        self._buf = bytearray()
        self._acks = True
        self.registers: dict[str, Register] = {}
        self._g_size = 0
        self.running = False
        self.closed = False
        try:
            self._handshake()
        except BaseException:
            self.sock.close()
            raise

    # ---------------------------------------------------------------- framing
    def _send(self, payload: bytes) -> None:
        frame = b"$" + escape(payload) + b"#" + checksum(escape(payload))
        try:
            self.sock.sendall(frame)
        except OSError as exc:
            raise GdbError(f"gdbstub connection lost: {exc}") from exc
        # Acks ('+') before the reply are skipped by _packet; a stop reply may come first.

    def _fill(self, deadline: float | None) -> bool:
        """Read more bytes; False when ``deadline`` passed first (None = wait forever)."""
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return False
        try:
            self.sock.settimeout(None if deadline is None else max(0.01, deadline
                                                                   - time.monotonic()))
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return False
        except OSError as exc:
            raise GdbError(f"gdbstub connection lost: {exc}") from exc
        if not chunk:
            self.closed = True
            raise GdbError("gdbstub closed the connection (the C-VM stopped?)")
        self._buf += chunk
        if len(self._buf) > 2 * MAX_PACKET:
            raise GdbError("gdbstub sent more than a packet's bound without a frame")
        return True

    def _packet(self, deadline: float | None) -> bytes | None:
        """The next packet's body, or None when ``deadline`` passed."""
        while True:
            start = self._buf.find(b"$")
            if start >= 0:
                end = self._buf.find(b"#", start)
                if end >= 0 and len(self._buf) >= end + 3:
                    body = bytes(self._buf[start + 1:end])
                    cs = bytes(self._buf[end + 1:end + 3])
                    del self._buf[:end + 3]
                    if cs.lower() != checksum(body):
                        raise GdbError("gdbstub packet with a bad checksum")
                    if self._acks:
                        self.sock.sendall(b"+")
                    return decode_body(body)
                if start > 0:
                    del self._buf[:start]  # stray acks before the frame
            elif self._buf:
                self._buf.clear()
            if not self._fill(deadline):
                return None

    def request(self, payload: str | bytes) -> bytes:
        """Send one packet and return the reply's body (``E..`` raises)."""
        data = payload.encode() if isinstance(payload, str) else payload
        self._send(data)
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._packet(deadline)
            if reply is None:
                raise GdbError(f"gdbstub did not answer {str(payload)[:24]!r} in "
                               f"{self.timeout:g} s")
            # The stop QEMU makes when a client attaches is reported asynchronously and
            # can arrive after our first request: a stop reply answers only '?'.
            if data == b"?" or not _STOP.match(reply):
                break
        if re.fullmatch(rb"E[0-9a-fA-F]{2}", reply):
            raise GdbError(f"gdbstub refused {str(payload)[:24]!r} ({reply.decode()})")
        return reply

    # -------------------------------------------------------------- handshake
    def _handshake(self) -> None:
        self.request("qSupported:multiprocess+;swbreak+;hwbreak+;xmlRegisters=i386")
        if self.request("QStartNoAckMode") == b"OK":
            self._acks = False
        parse_stop(self.request("?"))
        self._read_target_description()
        self.request("Hgp1.1")

    def _xfer(self, annex: str) -> str:
        data = bytearray()
        while len(data) < MAX_XML:
            chunk = self.request(f"qXfer:features:read:{annex}:{len(data):x},{0x3F00:x}")
            data += chunk[1:]
            if chunk[:1] == b"l":
                return data.decode("utf-8", "replace")
            if chunk[:1] != b"m":
                raise GdbError(f"gdbstub answered {chunk[:20]!r} for target description {annex}")
        raise GdbError("gdbstub target description larger than its bound")

    def _read_target_description(self) -> None:
        """Number the registers as the stub does: in document order, ``regnum`` resets."""
        order: list[tuple[str, int, int | None]] = []
        todo, seen = ["target.xml"], 0
        while todo:
            annex = todo.pop(0)
            seen += 1
            if seen > MAX_INCLUDES:
                raise GdbError("gdbstub target description includes too many files")
            try:
                # QEMU's XML uses an undeclared ``xi:`` prefix and a DOCTYPE ET won't fetch.
                text = re.sub(r"<!DOCTYPE[^>]*>", "", self._xfer(annex))
                root = ET.fromstring(text.replace("xi:include", "include"))
            except ET.ParseError as exc:
                raise GdbError(f"gdbstub target description {annex} is not XML: {exc}") from exc
            for el in root.iter():
                tag = el.tag.rsplit("}", 1)[-1]
                if tag == "include" and el.get("href"):
                    todo.append(str(el.get("href")))
                elif tag == "reg":
                    num = el.get("regnum")
                    order.append((str(el.get("name")), int(el.get("bitsize", "64")),
                                  int(num) if num is not None else None))
        number, offset = 0, 0
        for name, bits, regnum in order:
            if regnum is not None:
                number = regnum
            self.registers[name] = Register(name, number, bits, offset)
            offset += bits // 8
            number += 1
        for need in ("rip", "rsp", "rdi", "rsi", "gs_base"):
            if need not in self.registers:
                raise GdbError(f"gdbstub exposes no register '{need}': not an x86-64 target")

    # --------------------------------------------------------------- registers
    def threads(self) -> list[str]:
        """The VM's vCPUs as thread ids."""
        out: list[str] = []
        reply = self.request("qfThreadInfo")
        while reply[:1] == b"m" and len(out) < 1024:
            out += [t for t in reply[1:].decode("ascii", "replace").split(",") if t]
            reply = self.request("qsThreadInfo")
        return out

    def select_thread(self, thread: str) -> None:
        """Register reads and writes go to this vCPU from now on."""
        if self.request(f"Hg{thread}") != b"OK":
            raise GdbError(f"gdbstub cannot select vCPU {thread}")

    def read_registers(self) -> dict[str, int]:
        """The general registers of vCPU 1 in one ``g`` (names as in target.xml)."""
        raw = bytes.fromhex(self.request("g").decode("ascii", "replace").replace("x", "0"))
        out = {}
        for reg in self.registers.values():
            if reg.bits <= 64 and reg.offset + reg.bits // 8 <= len(raw):
                out[reg.name] = int.from_bytes(raw[reg.offset:reg.offset + reg.bits // 8],
                                               "little")
        return out

    def write_register(self, name: str, value: int) -> None:
        reg = self._reg(name)
        data = (value & ((1 << reg.bits) - 1)).to_bytes(reg.bits // 8, "little").hex()
        if self.request(f"P{reg.number:x}={data}") != b"OK":
            raise GdbError(f"gdbstub did not write register {name}")

    def _reg(self, name: str) -> Register:
        try:
            return self.registers[name]
        except KeyError:
            raise GdbError(f"gdbstub has no register '{name}'") from None

    # ------------------------------------------------------------------ memory
    def read_memory(self, address: int, size: int) -> bytes:
        if not 0 < size <= MAX_MEMORY_READ:
            raise GdbError(f"memory read of {size} bytes is out of bounds")
        reply = self.request(f"m{address:x},{size:x}")
        try:
            data = bytes.fromhex(reply.decode("ascii"))
        except ValueError as exc:
            raise GdbError(f"gdbstub sent malformed memory at 0x{address:x}") from exc
        if len(data) != size:
            raise GdbError(f"gdbstub read {len(data)} of {size} bytes at 0x{address:x}")
        return data

    def write_memory(self, address: int, data: bytes) -> None:
        if self.request(f"M{address:x},{len(data):x}:{data.hex()}") != b"OK":
            raise GdbError(f"gdbstub did not write memory at 0x{address:x}")

    # ------------------------------------------------------------ breakpoints
    def insert_breakpoint(self, address: int) -> None:
        # Z0 under TCG is kept by QEMU, not written into guest memory: invisible to the guest.
        if self.request(f"Z0,{address:x},1") != b"OK":
            raise GdbError(f"gdbstub refused a breakpoint at 0x{address:x}")

    def remove_breakpoint(self, address: int) -> None:
        self.request(f"z0,{address:x},1")

    # --------------------------------------------------------------- running
    def cont(self) -> None:
        self._send(b"c")
        self.running = True

    def step(self, timeout: float | None = None) -> StopReply:
        self._send(b"s")
        self.running = True
        reply = self.wait(timeout if timeout is not None else self.timeout)
        if reply is None:
            raise GdbError("single step did not stop in time")
        return reply

    def interrupt(self) -> None:
        """Ask a running VM to stop; its stop reply arrives through ``wait``."""
        try:
            self.sock.sendall(INTERRUPT)
        except OSError as exc:
            raise GdbError(f"gdbstub connection lost: {exc}") from exc

    def wait(self, timeout: float | None) -> StopReply | None:
        """The next stop reply, or None after ``timeout`` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            body = self._packet(deadline)
            if body is None:
                return None
            if body[:1] == b"O":  # console output packets: not a stop
                continue
            self.running = False
            return parse_stop(body)

    def detach(self) -> None:
        """Leave the VM running with no breakpoints (``D;1``: the multiprocess form)."""
        if self.closed:
            return
        try:
            if self.running:
                self.interrupt()
                self.wait(self.timeout)
            self.request("D;1")
        finally:
            self.close()

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def owner_file(path: Path) -> Path:
    """Where an attached client records its pid, so a crash can be cleaned up."""
    return path.with_name(path.name + ".owner")


def release(path: Path) -> None:
    """Detach on behalf of a client that died attached: breakpoints go, the VM runs."""
    try:
        Gdbstub(path, timeout=5.0).detach()
    except GdbError:
        return
    owner_file(path).unlink(missing_ok=True)
