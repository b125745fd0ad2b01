"""Property-based fuzzing of the RTP packet parser: arbitrary and mutated datagrams never raise
anything but RtpParseError with a known reason, and what parses re-serializes to itself."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from receiver.rtp.packet import RtpPacket, RtpParseError, TelephoneEvent, is_rtcp
from tests.fuzzing import FAST, PARSE_REASONS, rtp_packets


def mutated_datagrams() -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, and valid packets with a few bytes changed or cut (closer to the parser's
    edges than pure noise: version 2, the flag bits, lengths that almost fit)."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(rtp_packets(max_payload=64)).serialize())
        for _ in range(draw(st.integers(0, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data[: draw(st.integers(0, len(data)))])

    return st.one_of(st.binary(max_size=200), mutate())


@FAST
@given(mutated_datagrams())
@example(b"\x80")
@example(b"\xa0\x00" + bytes(10))  # padding bit, nothing after the header
@example(b"\x9f\x00" + bytes(10))  # 15 CSRCs announced, none there
@example(b"\x90\x00" + bytes(10) + b"\x00\x00\xff\xff")  # a 65535-word extension
def test_rtp_parse_never_raises_anything_else(data: bytes) -> None:
    is_rtcp(data)
    try:
        packet = RtpPacket.parse(data)
    except RtpParseError as exc:
        assert exc.reason in PARSE_REASONS, exc.reason
        return
    assert packet.payload_type < 128 and packet.sequence <= 0xFFFF
    # What parses, re-serializes to something that parses to the same packet.
    assert RtpPacket.parse(packet.serialize()) == packet
    try:
        TelephoneEvent.parse(packet.payload)
    except RtpParseError as exc:
        assert exc.reason == "bad_telephone_event"


@FAST
@given(rtp_packets())
def test_rtp_serialize_then_parse_is_identity(packet: RtpPacket) -> None:
    assert RtpPacket.parse(packet.serialize()) == packet
