"""Fuzzing: whatever bytes or frames arrive, the cores only ever emit events."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vims.protocol.core import State
from vims.protocol.events import ProtocolError, ReportReceived
from vims.protocol.framing import encode_frame
from vims.protocol.messages import canonical_json
from vims.protocol.testing import Pair

TYPES = ["hello", "challenge", "evidence", "policy", "policy_ack", "policy_update",
         "report", "report_ack", "heartbeat", "error", "bye", "nope"]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)
frames = st.builds(
    lambda t, v, extra: {"type": t, "version": v, **extra},
    st.sampled_from(TYPES),
    st.sampled_from([1, 1, 1, 2, "1"]),
    st.dictionaries(st.sampled_from(["cvm", "seq", "prev_hash", "body", "nonce", "avm_id",
                                     "cvms", "code", "digest", "policy"]), json_values,
                    max_size=4),
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _feed_both(pair: Pair, chunks: list[bytes]) -> None:
    for chunk in chunks:
        pair.rems.receive_data(chunk, pair.clock.now)
        pair.avm.receive_data(chunk, pair.clock.now)
        pair.rems.handle_timer(pair.clock.advance(1))
        pair.avm.handle_timer(pair.clock.now)
    for side in (pair.avm, pair.rems):
        for event in side.events():
            assert not isinstance(event, ReportReceived)
        assert side.data_to_send() is not None


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=6), st.booleans())
def test_random_bytes(chunks: list[bytes], active: bool) -> None:
    pair = Pair()
    if active:
        pair.handshake()
    _feed_both(pair, chunks)


@FUZZ
@given(st.lists(frames, min_size=1, max_size=5), st.booleans())
def test_random_frames(msgs: list[dict[str, Any]], active: bool) -> None:
    pair = Pair()
    if active:
        pair.handshake()
    _feed_both(pair, [encode_frame(canonical_json(m)) for m in msgs])


@FUZZ
@given(st.lists(frames, min_size=1, max_size=3))
def test_random_frames_end_in_error_or_are_ignored(msgs: list[dict[str, Any]]) -> None:
    """A REM-S in ACTIVE either stays ACTIVE (heartbeat) or closes with a ProtocolError."""
    pair = Pair()
    pair.handshake()
    pair.rems_events.clear()
    for m in msgs:
        pair.rems.receive_data(encode_frame(canonical_json(m)), pair.clock.now)
    events = list(pair.rems.events())
    if pair.rems.state is State.CLOSED:
        assert any(isinstance(e, ProtocolError) for e in events) or any(
            m["type"] == "bye" for m in msgs
        )
