import struct

import pytest

from receiver.rtp.packet import (
    AUDIO_CODECS,
    RtpPacket,
    RtpParseError,
    TelephoneEvent,
    is_rtcp,
)

# A real-looking PCMU packet: V=2, PT 0, seq 0x1234, ts 0x89abcdef, SSRC 0xdeadbeef, 4 bytes.
PCMU = bytes.fromhex("80 00 1234 89abcdef deadbeef ff7f0080")


def header(
    first: int = 0x80,
    second: int = 0x00,
    sequence: int = 1,
    timestamp: int = 160,
    ssrc: int = 0x11223344,
) -> bytes:
    return struct.pack("!BBHII", first, second, sequence, timestamp, ssrc)


def parse_error(data: bytes) -> str:
    with pytest.raises(RtpParseError) as info:
        RtpPacket.parse(data)
    return info.value.reason


def test_parse_plain_pcmu() -> None:
    packet = RtpPacket.parse(PCMU)
    assert packet == RtpPacket(
        payload_type=0,
        marker=False,
        sequence=0x1234,
        timestamp=0x89ABCDEF,
        ssrc=0xDEADBEEF,
        payload=b"\xff\x7f\x00\x80",
    )
    assert packet.csrcs == ()
    assert packet.extension_profile is None
    assert packet.extension == b""
    assert packet.padding == 0


def test_parse_marker_and_payload_type() -> None:
    packet = RtpPacket.parse(header(second=0x88) + b"\xd5" * 160)
    assert packet.marker is True
    assert packet.payload_type == 8
    assert packet.payload == b"\xd5" * 160


def test_parse_max_values() -> None:
    data = header(second=0xFF, sequence=0xFFFF, timestamp=0xFFFFFFFF, ssrc=0xFFFFFFFF)
    packet = RtpPacket.parse(data)
    assert (packet.marker, packet.payload_type) == (True, 127)
    assert (packet.sequence, packet.timestamp, packet.ssrc) == (0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    assert packet.payload == b""


def test_parse_header_only_is_empty_payload() -> None:
    assert RtpPacket.parse(header()).payload == b""


def test_parse_csrcs() -> None:
    data = header(first=0x82) + struct.pack("!II", 0xAAAAAAAA, 0x00000001) + b"abc"
    packet = RtpPacket.parse(data)
    assert packet.csrcs == (0xAAAAAAAA, 1)
    assert packet.payload == b"abc"


def test_parse_fifteen_csrcs() -> None:
    csrcs = tuple(range(1, 16))
    packet = RtpPacket.parse(header(first=0x8F) + struct.pack("!15I", *csrcs) + b"x")
    assert packet.csrcs == csrcs
    assert packet.payload == b"x"


def test_parse_extension() -> None:
    data = header(first=0x90) + struct.pack("!HH", 0xBEDE, 2) + b"12345678" + b"payload"
    packet = RtpPacket.parse(data)
    assert packet.extension_profile == 0xBEDE
    assert packet.extension == b"12345678"
    assert packet.payload == b"payload"


def test_parse_empty_extension() -> None:
    packet = RtpPacket.parse(header(first=0x90) + struct.pack("!HH", 0x1000, 0) + b"p")
    assert packet.extension_profile == 0x1000
    assert packet.extension == b""
    assert packet.payload == b"p"


def test_parse_padding_is_stripped() -> None:
    packet = RtpPacket.parse(header(first=0xA0) + b"audio" + b"\x00\x00\x03")
    assert packet.payload == b"audio"
    assert packet.padding == 3


def test_parse_padding_of_one_byte() -> None:
    packet = RtpPacket.parse(header(first=0xA0) + b"audio" + b"\x01")
    assert packet.payload == b"audio"
    assert packet.padding == 1


def test_parse_padding_can_consume_the_whole_payload() -> None:
    packet = RtpPacket.parse(header(first=0xA0) + b"\x00\x00\x00\x04")
    assert packet.payload == b""
    assert packet.padding == 4


def test_parse_all_features_combined() -> None:
    data = (
        header(first=0x80 | 0x20 | 0x10 | 0x01, second=0x80 | 101)
        + struct.pack("!I", 0xCAFEBABE)
        + struct.pack("!HH", 0xBEDE, 1)
        + b"\x10\xff\x00\x00"
        + b"\x05\x0a\x00\xa0"
        + b"\x00\x02"
    )
    packet = RtpPacket.parse(data)
    assert packet == RtpPacket(
        payload_type=101,
        marker=True,
        sequence=1,
        timestamp=160,
        ssrc=0x11223344,
        payload=b"\x05\x0a\x00\xa0",
        csrcs=(0xCAFEBABE,),
        extension_profile=0xBEDE,
        extension=b"\x10\xff\x00\x00",
        padding=2,
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "too_short"),
        (PCMU[:11], "too_short"),
        (bytes([0x40]) + PCMU[1:], "bad_version"),
        (bytes([0x00]) + PCMU[1:], "bad_version"),
        (bytes([0xC0]) + PCMU[1:], "bad_version"),
        (header(first=0x81), "csrc_past_end"),
        (header(first=0x82) + b"\x00" * 7, "csrc_past_end"),
        (header(first=0x90), "extension_past_end"),
        (header(first=0x90) + b"\xbe\xde\x00", "extension_past_end"),
        (header(first=0x90) + b"\xbe\xde\x00\x01" + b"\x00" * 3, "extension_past_end"),
        (
            header(first=0x91) + b"\x00" * 4 + b"\xbe\xde\x00\x02" + b"\x00" * 4,
            "extension_past_end",
        ),
        (header(first=0xA0), "padding_past_end"),
        (header(first=0xA0) + b"ab\x04", "padding_past_end"),
        (header(first=0xB0) + b"\xbe\xde\x00\x00" + b"\x05", "padding_past_end"),
        (header(first=0xA0) + b"abc\x00", "bad_padding"),
    ],
)
def test_parse_malformed(data: bytes, reason: str) -> None:
    assert parse_error(data) == reason


def test_parse_error_is_a_value_error_with_a_message() -> None:
    with pytest.raises(ValueError, match="RTP version 1"):
        RtpPacket.parse(bytes([0x40]) + PCMU[1:])


@pytest.mark.parametrize(
    "packet",
    [
        RtpPacket(0, False, 0, 0, 0, b""),
        RtpPacket(8, True, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, b"\xd5" * 240),
        RtpPacket(127, True, 7, 8, 9, b"x", csrcs=tuple(range(15))),
        RtpPacket(0, False, 1, 2, 3, b"y", extension_profile=0xBEDE, extension=b"abcdefgh"),
        RtpPacket(0, False, 1, 2, 3, b"y", extension_profile=0, extension=b""),
        RtpPacket(0, False, 1, 2, 3, b"z", padding=1),
        RtpPacket(0, False, 1, 2, 3, b"", padding=255),
        RtpPacket(101, True, 1, 2, 3, b"\x05\x80\x03\x20", (4, 5), 0x100, b"\x00" * 12, padding=4),
    ],
)
def test_serialize_round_trip(packet: RtpPacket) -> None:
    assert RtpPacket.parse(packet.serialize()) == packet


def test_serialize_bytes_exactly() -> None:
    assert RtpPacket.parse(PCMU).serialize() == PCMU
    assert RtpPacket(0, False, 1, 160, 0x11223344, b"ab", padding=2).serialize() == (
        header(first=0xA0) + b"ab\x00\x02"
    )


@pytest.mark.parametrize(
    "packet",
    [
        RtpPacket(0, False, 1, 2, 3, b"", csrcs=tuple(range(16))),
        RtpPacket(0, False, 1, 2, 3, b"", extension_profile=1, extension=b"abc"),
        RtpPacket(0, False, 1, 2, 3, b"", padding=256),
    ],
)
def test_serialize_rejects_unrepresentable(packet: RtpPacket) -> None:
    with pytest.raises(ValueError):
        packet.serialize()


def test_packet_has_no_instance_dict() -> None:
    # slots keep a parsed packet small; it is not frozen because that doubles the parse cost
    packet = RtpPacket.parse(PCMU)
    with pytest.raises(AttributeError):
        packet.unknown_field = 1  # type: ignore[attr-defined]


# SR, RR, SDES, BYE, APP; RTPFB, PSFB, XR; the ends of RFC 5761's range 192..223
@pytest.mark.parametrize("packet_type", [200, 201, 202, 203, 204, 205, 206, 207, 192, 223])
def test_is_rtcp(packet_type: int) -> None:
    assert is_rtcp(bytes([0x81, packet_type, 0x00, 0x07]) + bytes(28))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x80",
        PCMU,  # PT 0
        bytes([0x80, 0x88]) + PCMU[2:],  # PCMA with marker: 0x88 = 136
        bytes([0x80, 0x80 | 63]) + PCMU[2:],  # 191, and 224: just outside RFC 5761's range
        bytes([0x80, 0x80 | 96]) + PCMU[2:],
        bytes([0x80, 101]) + PCMU[2:],  # telephone-event, the dynamic range 96..127
        bytes([0x80, 0x80 | 101]) + PCMU[2:],
        bytes([0x40, 200]) + PCMU[2:],  # version 1
    ],
)
def test_is_not_rtcp(data: bytes) -> None:
    assert not is_rtcp(data)


@pytest.mark.parametrize("payload_type", [64, 72, 76, 95])
def test_rtcp_packet_types_overlap_rtp_marker_payload_types(payload_type: int) -> None:
    # PT 64..95 with the marker set is indistinguishable from RTCP 192..223: RFC 5761 forbids
    # those PTs on a port shared with RTCP, so without the marker they are not audio either.
    assert is_rtcp(bytes([0x80, 0x80 | payload_type]) + bytes(10))
    assert is_rtcp(bytes([0x80, payload_type]) + bytes(10))


def test_audio_codecs() -> None:
    assert AUDIO_CODECS == {0: "PCMU", 8: "PCMA", 9: "G722"}  # the static ones (RFC 3551)


def test_telephone_event_parse() -> None:
    event = TelephoneEvent.parse(b"\x05\x8a\x03\x20")
    assert event == TelephoneEvent(event=5, end=True, volume=10, duration=800)
    assert event.digit == "5"


def test_telephone_event_reserved_bit_is_ignored() -> None:
    assert TelephoneEvent.parse(b"\x0b\x4a\x00\xa0") == TelephoneEvent(11, False, 10, 160)


def test_telephone_event_max_values() -> None:
    event = TelephoneEvent.parse(b"\xff\xff\xff\xff")
    assert event == TelephoneEvent(event=255, end=True, volume=63, duration=0xFFFF)


def test_telephone_event_ignores_trailing_bytes() -> None:
    assert TelephoneEvent.parse(b"\x01\x00\x00\x50extra") == TelephoneEvent(1, False, 0, 80)


@pytest.mark.parametrize("payload", [b"", b"\x05", b"\x05\x8a\x03"])
def test_telephone_event_too_short(payload: bytes) -> None:
    with pytest.raises(RtpParseError) as info:
        TelephoneEvent.parse(payload)
    assert info.value.reason == "bad_telephone_event"


def test_telephone_event_round_trip() -> None:
    event = TelephoneEvent(event=12, end=True, volume=63, duration=0xFFFF)
    assert TelephoneEvent.parse(event.serialize()) == event


@pytest.mark.parametrize(
    ("event", "digit"),
    [
        (0, "0"),
        (1, "1"),
        (9, "9"),
        (10, "*"),
        (11, "#"),
        (12, "A"),
        (13, "B"),
        (14, "C"),
        (15, "D"),
        (16, "flash"),
        (17, "event-17"),
        (255, "event-255"),
    ],
)
def test_telephone_event_digit(event: int, digit: str) -> None:
    assert TelephoneEvent(event=event, end=False, volume=0, duration=0).digit == digit
