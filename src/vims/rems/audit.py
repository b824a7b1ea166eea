"""Signed checkpoints of the REM-S audit chain, and their verification.

The audit table is hash-chained (:meth:`Store.verify_audit`): an entry edited,
removed or reordered in the middle breaks the chain. Someone who can write the
database can still do two things the chain cannot see: cut off the newest
entries (the chain that is left links up), or edit an old entry and recompute
every hash after it (re-chaining). A checkpoint closes both:

- every ``audit_checkpoint_s`` (and at shutdown) the REM-S signs the chain's
  head: an ES256 JWS, typed ``vims-audit-checkpoint+jwt``, over ``{iss, iat,
  audit_id, hash, entries, ts, prev_checkpoint_hash}``, stored in
  ``audit_checkpoints``; re-chaining changes the hash at a signed position, and
  the key to sign a new head is not in the database;
- the same token is appended, as one line, to a file outside the database
  (append-only: ``chattr +a``, another host, WORM storage): cutting off the
  newest entries *and* the checkpoints that covered them leaves the file naming
  entries that are gone.

:func:`checkpoint` signs only a chain that links up from the last checkpoint,
whose head is still in place, and, given the file, whose last line is still in
the database: the REM-S notices tampering at its next checkpoint instead of
signing over it. :func:`verify` is what ``vims rems audit verify`` runs.

Entries after the last checkpoint are not signed yet: :func:`verify` counts them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Connection, func, insert, select

from vims.errors import VimsError
from vims.rems import jws
from vims.rems import schema as s
from vims.rems.jws import token_hash
from vims.rems.store import GENESIS, Store, StoreError, chain_hash

__all__ = ["CHECKPOINT_TYP", "AuditBroken", "AuditError", "AuditReport", "Checkpoint",
           "checkpoint", "checkpoint_loop", "decode_checkpoint", "token_hash", "verify"]

log = logging.getLogger(__name__)

CHECKPOINT_TYP = "vims-audit-checkpoint+jwt"
_CLAIMS = ("iss", "iat", "audit_id", "hash", "entries", "ts")
_TAIL_BYTES = 64 * 1024  # enough to hold the file's last lines (a token is ~500 bytes)
# Checkpoints of one process go to the file in the order they were committed.
_checkpoint_lock = threading.Lock()


class AuditError(VimsError):
    """Audit verification cannot run: a key or checkpoint file is unusable."""


class AuditBroken(StoreError):
    """The audit chain does not extend what the REM-S signed before; nothing was signed."""


@dataclass(frozen=True)
class Checkpoint:
    """A signed head of the audit chain: entry ``audit_id`` has ``hash``, ``entries``
    entries from the start."""

    id: int
    audit_id: int
    hash: str
    entries: int
    ts: float
    token: str


@dataclass(frozen=True)
class AuditReport:
    """What :func:`verify` found; ``reason`` is one line when ``ok`` is False."""

    ok: bool
    entries: int
    first_bad_id: int | None = None
    reason: str = ""
    checkpoints: int = 0
    file_checkpoints: int | None = None
    signed_entries: int = 0
    unsigned_entries: int = 0
    signatures_checked: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------- signing
def checkpoint(store: Store, key: ec.EllipticCurvePrivateKey, issuer: str,
               file: Path | None = None) -> Checkpoint | None:
    """Sign the audit chain's head if it moved since the last checkpoint.

    Returns the new checkpoint, or None when there was nothing new to sign (or
    another REM-S instance signed meanwhile). Raises :class:`AuditBroken`, and
    signs nothing, when the chain since the last checkpoint does not link up,
    the last checkpointed entry is gone or changed, or ``file``'s last
    checkpoint is not in the database. The chain is walked outside the write
    lock (ingest keeps going); the lock is held only to confirm the head and
    store the checkpoint, which then goes to ``file`` (appended, fsynced).
    """
    with _checkpoint_lock:
        with store.engine.connect() as conn:
            last = _last_checkpoint(conn)
            if file is not None:
                _check_file_head(conn, file, last)
            head = _walk_from(conn, last)
        if head is None:
            return None
        audit_id, digest, entries = head
        with store._write() as conn:
            now = _last_checkpoint(conn)
            if (now.id if now else None) != (last.id if last else None):
                return None  # another instance signed meanwhile: its turn
            current = conn.execute(select(s.audit.c.hash)
                                   .where(s.audit.c.id == audit_id)).scalar()
            if current != digest:
                raise AuditBroken(f"audit entry {audit_id} changed while being checkpointed")
            ts = round(time.time(), 6)
            claims: dict[str, Any] = {"iss": issuer, "iat": int(ts), "audit_id": audit_id,
                                      "hash": digest, "entries": entries, "ts": ts}
            if last is not None:
                claims["prev_checkpoint_hash"] = token_hash(last.token)
            token = jws.sign(claims, key, CHECKPOINT_TYP)
            inserted = conn.execute(insert(s.audit_checkpoints).values(
                audit_id=audit_id, hash=digest, entries=entries, ts=ts, token=token))
            assert inserted.inserted_primary_key is not None
            new_id = int(inserted.inserted_primary_key[0])
        # After the commit: a line in the file is a checkpoint the database has.
        if file is not None:
            _append_line(file, token)
        log.info("audit checkpoint %s: entry %s, %s entries", new_id, audit_id, entries)
        return Checkpoint(new_id, audit_id, digest, entries, ts, token)


async def checkpoint_loop(store: Store, key: ec.EllipticCurvePrivateKey, issuer: str,
                          file: Path | None, interval_s: float) -> None:
    """Checkpoint now and every ``interval_s``, off the event loop, until cancelled.

    A refusal (:class:`AuditBroken`: tampering seen) is logged as an error, once
    per distinct reason; other failures (database away) are logged and retried at
    the next interval. The server should also ``await asyncio.to_thread(checkpoint,
    ...)`` once at shutdown, after the last write.
    """
    last_error = ""
    while True:
        try:
            await asyncio.to_thread(checkpoint, store, key, issuer, file)
            last_error = ""
        except AuditBroken as exc:
            if str(exc) != last_error:
                log.error("audit checkpoint refused: %s", exc)
            last_error = str(exc)
        except Exception as exc:  # noqa: BLE001 - the database may be away: retry later
            log.warning("audit checkpoint failed: %s", " ".join(str(exc).split()))
        await asyncio.sleep(interval_s)


def _last_checkpoint(conn: Connection) -> Checkpoint | None:
    row = conn.execute(select(s.audit_checkpoints)
                       .order_by(s.audit_checkpoints.c.id.desc()).limit(1)).first()
    return None if row is None else _row(row)


def _row(row: Any) -> Checkpoint:
    return Checkpoint(int(row.id), int(row.audit_id), str(row.hash), int(row.entries),
                      float(row.ts), str(row.token))


def _walk_from(conn: Connection, last: Checkpoint | None) -> tuple[int, str, int] | None:
    """Verify the chain from ``last`` to the tail; the new head (id, hash, entries)."""
    prev, entries, after = GENESIS, 0, None
    if last is not None:
        current = conn.execute(select(s.audit.c.hash)
                               .where(s.audit.c.id == last.audit_id)).first()
        if current is None:
            raise AuditBroken(f"audit entry {last.audit_id}, signed by checkpoint {last.id}, "
                              "is gone: the log was truncated")
        if current.hash != last.hash:
            raise AuditBroken(f"audit entry {last.audit_id} no longer has the hash checkpoint "
                              f"{last.id} signed: the log was re-written")
        prev, entries, after = last.hash, last.entries, last.audit_id
    query = select(s.audit).order_by(s.audit.c.id)
    if after is not None:
        query = query.where(s.audit.c.id > after)
    head_id = None
    for row in conn.execute(query):
        # The same entry encoding as Store.verify_audit: the chain has one definition.
        entry = {"ts": row.ts, "kind": row.kind, "subject": row.subject,
                 "payload": json.loads(row.payload)}
        if row.prev_hash != prev:
            raise AuditBroken(f"audit entry {row.id}: an entry before it is missing or "
                              "reordered")
        if chain_hash(prev, entry) != row.hash:
            raise AuditBroken(f"audit entry {row.id} altered")
        prev, entries, head_id = row.hash, entries + 1, int(row.id)
    return None if head_id is None else (head_id, prev, entries)


def _check_file_head(conn: Connection, file: Path, last: Checkpoint | None) -> None:
    """The file's newest checkpoint must still be in the database."""
    token = _last_file_token(file)
    if token is None or (last is not None and token == last.token):
        return
    claims = jwt.decode(token, options={"verify_signature": False})
    found = conn.execute(select(func.count()).select_from(s.audit_checkpoints)
                         .where(s.audit_checkpoints.c.token == token)).scalar()
    if not found:
        raise AuditBroken(f"the last checkpoint in {file} (audit entry {claims.get('audit_id')},"
                          f" {claims.get('entries')} entries) is not in the database: "
                          "checkpoints were deleted, the log likely truncated")


def _last_file_token(file: Path) -> str | None:
    try:
        with file.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _TAIL_BYTES))
            tail = f.read().decode(errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(f"checkpoint file {file}: {exc.strerror}") from exc
    for line in reversed(tail.split("\n")):
        if _well_formed(line.strip()) is not None:
            return line.strip()
    return None


def _append_line(file: Path, token: str) -> None:
    """Append one line and fsync it (and the directory, when the file is new)."""
    created = not file.exists()
    fd = os.open(file, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        data = token.encode() + b"\n"
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # a torn line from a crash stays on its own line
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        dir_fd = os.open(file.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ---------------------------------------------------------------- verifying
Keys = ec.EllipticCurvePublicKey | Mapping[str, ec.EllipticCurvePublicKey]


def decode_checkpoint(token: str, keys: Keys | None) -> dict[str, Any]:
    """A checkpoint token's claims, its signature verified unless ``keys`` is None."""
    if keys is None:
        if jwt.get_unverified_header(token).get("typ") != CHECKPOINT_TYP:
            raise jwt.InvalidTokenError("not an audit checkpoint (typ)")
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    else:
        claims = jws.decode(token, keys, typ=CHECKPOINT_TYP, require=_CLAIMS)
    for name in ("audit_id", "entries"):
        if not isinstance(claims.get(name), int) or isinstance(claims.get(name), bool):
            raise jwt.InvalidTokenError(f"checkpoint claim {name} is not an integer")
    if not isinstance(claims.get("hash"), str):
        raise jwt.InvalidTokenError("checkpoint claim hash is not a string")
    return claims


@dataclass
class _Findings:
    """Problems by rank: the first of the lowest rank is the one reported."""

    items: list[tuple[int, int, int | None, str]] = field(default_factory=list)

    def add(self, rank: int, audit_id: int | None, reason: str) -> None:
        self.items.append((rank, len(self.items), audit_id, " ".join(reason.split())))

    def first(self) -> tuple[int | None, str] | None:
        if not self.items:
            return None
        rank = min(i[0] for i in self.items)
        same = [i for i in self.items if i[0] == rank]
        # Within the chain-position rank the earliest entry tells most; else the order seen.
        pick = min(same, key=lambda i: (i[2] if rank == _POSITION and i[2] is not None
                                        else 0, i[1]))
        return pick[2], pick[3]


_SIGNATURE, _RECORD, _POSITION, _SEQUENCE, _FILE = range(5)


def verify(store: Store, public_key: Keys | None, file: Path | None = None) -> AuditReport:
    """Walk the audit chain and check it against its signed checkpoints.

    ``public_key`` is the REM-S key (or a key set by ``kid``, from its JWK set);
    None checks the checkpoints' consistency but not their signatures, and says
    so in ``notes``. ``file`` is the append-only copy of the checkpoints.
    Detected, each as one line in ``reason``: a broken chain; a checkpoint not
    signed by the key; a checkpoint row that differs from its token; a signed
    entry that is gone (truncation) or has another hash or position
    (re-chaining); checkpoints missing, reordered or going backwards; a
    checkpoint in ``file`` that is not in the database.
    """
    chain = store.verify_audit()
    checked = public_key is not None
    if not chain.ok:
        return AuditReport(False, chain.entries, chain.first_bad_id, chain.reason,
                           signatures_checked=checked)
    notes = [] if checked else ["checkpoint signatures not checked: no key given"]
    found = _Findings()
    # Expected (hash, entries) at chain positions, by audit id, with who signed them.
    expect: dict[int, list[tuple[str, str, int]]] = {}

    with store.engine.connect() as conn:
        rows = [_row(r) for r in conn.execute(select(s.audit_checkpoints)
                                              .order_by(s.audit_checkpoints.c.id))]
    db_tokens = {cp.token for cp in rows}
    valid: list[tuple[Checkpoint, dict[str, Any]]] = []
    for cp in rows:
        label = f"checkpoint {cp.id}"
        try:
            claims = decode_checkpoint(cp.token, public_key)
        except jwt.InvalidTokenError as exc:
            found.add(_SIGNATURE, cp.audit_id, f"{label} (audit entry {cp.audit_id}) is not "
                      f"signed by the REM-S key: {_signature_reason(exc)}")
            continue
        if (claims["audit_id"], claims["hash"], claims["entries"]) != (
                cp.audit_id, cp.hash, cp.entries) or claims.get("ts") != cp.ts:
            found.add(_RECORD, cp.audit_id, f"{label}: its row differs from its signed token "
                      "(the checkpoints table was edited)")
        valid.append((cp, claims))
        expect.setdefault(claims["audit_id"], []).append(
            (label, claims["hash"], claims["entries"]))
    _check_sequence(valid, found)

    file_count: int | None = None
    if file is not None:
        file_count = _check_file(file, public_key, db_tokens, expect, found, notes)

    total, last_id = 0, None
    with store.engine.connect() as conn:
        for audit_id, digest in conn.execute(select(s.audit.c.id, s.audit.c.hash)
                                             .order_by(s.audit.c.id)):
            total += 1
            last_id = audit_id
            for label, signed_hash, signed_entries in expect.pop(audit_id, ()):
                if signed_hash != digest:
                    found.add(_POSITION, audit_id, f"audit log re-written: entry {audit_id} "
                              f"does not have the hash signed in {label} (an earlier entry "
                              "was changed and the chain recomputed)")
                elif signed_entries != total:
                    found.add(_POSITION, audit_id, f"audit log re-written: {total} entries up "
                              f"to entry {audit_id}, {label} signed {signed_entries}")
    for audit_id in sorted(expect):
        for label, _hash, signed_entries in expect[audit_id]:
            found.add(_POSITION, audit_id, f"audit log truncated: entry {audit_id} "
                      f"({signed_entries} entries), signed in {label}, is gone (the log ends "
                      f"at entry {last_id}, {total} entries)")

    signed = max((claims["entries"] for _cp, claims in valid), default=0)
    problem = found.first()
    return AuditReport(ok=problem is None, entries=chain.entries,
                       first_bad_id=None if problem is None else problem[0],
                       reason="" if problem is None else problem[1],
                       checkpoints=len(rows), file_checkpoints=file_count,
                       signed_entries=signed, unsigned_entries=max(0, chain.entries - signed),
                       signatures_checked=checked, notes=notes)


def _signature_reason(exc: jwt.InvalidTokenError) -> str:
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad signature"
    return f"bad signature or token ({exc})"


def _check_sequence(valid: list[tuple[Checkpoint, dict[str, Any]]], found: _Findings) -> None:
    """Checkpoints name their predecessor and only move forward."""
    prev: tuple[Checkpoint, dict[str, Any]] | None = None
    for cp, claims in valid:
        named = claims.get("prev_checkpoint_hash")
        if prev is None:
            if named is not None:
                found.add(_SEQUENCE, cp.audit_id, f"checkpoint {cp.id} names a predecessor "
                          "that is missing (earlier checkpoints were deleted)")
        else:
            pcp, pclaims = prev
            if named != token_hash(pcp.token):
                found.add(_SEQUENCE, cp.audit_id, f"a checkpoint between checkpoints {pcp.id} "
                          f"and {cp.id} is missing (checkpoints were deleted or replaced)")
            if claims["audit_id"] <= pclaims["audit_id"] or \
                    claims["entries"] <= pclaims["entries"]:
                found.add(_SEQUENCE, cp.audit_id, f"checkpoint {cp.id} goes backwards from "
                          f"checkpoint {pcp.id}")
        prev = (cp, claims)


def _check_file(file: Path, keys: Keys | None, db_tokens: set[str],
                expect: dict[int, list[tuple[str, str, int]]], found: _Findings,
                notes: list[str]) -> int:
    """Check the file's checkpoints; how many readable ones it holds."""
    try:
        lines = file.read_text(errors="replace").split("\n")
    except FileNotFoundError:
        if db_tokens:
            found.add(_FILE, None, f"checkpoint file {file} is gone, yet the database has "
                      f"{len(db_tokens)} checkpoints")
        else:
            notes.append(f"no checkpoint file {file} yet")
        return 0
    except OSError as exc:
        raise AuditError(f"checkpoint file {file}: {exc.strerror}") from exc
    count, unreadable = 0, 0
    prev: tuple[int, int, int] | None = None  # line, audit_id, entries
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        if _well_formed(line) is None:
            unreadable += 1  # a torn write (crash mid-append): it signs nothing
            continue
        label = f"{file} line {number}"
        try:
            claims = decode_checkpoint(line, keys)
        except jwt.InvalidTokenError as exc:
            found.add(_SIGNATURE, None, f"{label} is not signed by the REM-S key: "
                      f"{_signature_reason(exc)}")
            continue
        count += 1
        if prev is not None and (claims["audit_id"] <= prev[1] or claims["entries"] <= prev[2]):
            found.add(_FILE, claims["audit_id"], f"{label} goes backwards from line {prev[0]}")
        prev = (number, claims["audit_id"], claims["entries"])
        if line not in db_tokens:
            found.add(_FILE, claims["audit_id"], f"the checkpoint of audit entry "
                      f"{claims['audit_id']} in {label} is not in the database (checkpoints "
                      "were deleted)")
        expect.setdefault(claims["audit_id"], []).append(
            (label, claims["hash"], claims["entries"]))
    if unreadable:
        notes.append(f"{unreadable} unreadable line{'s' if unreadable > 1 else ''} in {file} "
                     "ignored (torn writes?)")
    return count


def _well_formed(line: str) -> dict[str, Any] | None:
    """The header of a complete compact ES256 JWS, or None for anything else."""
    parts = line.split(".")
    if len(parts) != 3:
        return None
    try:
        header, payload, sig = (base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))
                                for p in parts)
        decoded = json.loads(header), json.loads(payload)
    except (binascii.Error, ValueError):
        return None
    if len(sig) != 64 or not all(isinstance(d, dict) for d in decoded):
        return None
    return decoded[0]  # type: ignore[no-any-return]
