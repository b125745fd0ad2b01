"""RTP (RFC 3550) and telephone-event (RFC 4733) packet formats."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from receiver.codecs.encoding import Encoding

PT_PCMU = 0
PT_PCMA = 8
PT_G722 = 9
PT_COMFORT_NOISE = 13  # RFC 3389
DEFAULT_TELEPHONE_EVENT_PT = 101  # dynamic; whatever the tap was configured with

#: Static audio payload types we record. G.711 at 8 kHz: one byte = one sample; G.722: its RTP
#: clock is 8000 Hz too (RFC 3551 §4.5.2), one byte = one tick = two samples of its 16 kHz audio.
AUDIO_CODECS: dict[int, Encoding] = {
    PT_PCMU: Encoding.PCMU,
    PT_PCMA: Encoding.PCMA,
    PT_G722: Encoding.G722,
}


def rtp_clock_rate(codec: Encoding) -> int:
    """The RTP timestamp clock of `codec`: Opus 48 kHz (RFC 7587), the others 8 kHz."""
    return 48000 if codec is Encoding.OPUS else 8000


RTP_VERSION = 2
RTP_HEADER_LENGTH = 12

_HEADER = struct.Struct("!BBHII")
_EXTENSION_HEADER = struct.Struct("!HH")
_TELEPHONE_EVENT = struct.Struct("!BBH")

# RFC 5761 §4: RTCP packet types 192..223 (SR, RR, SDES, BYE, APP, RTPFB, PSFB, XR, ...) sit
# where an RTP header has the marker bit and payload types 64..95, which RTP must therefore not
# use on a port shared with RTCP.
_RTCP_PAYLOAD_TYPES = range(64, 96)

_DIGITS = "0123456789*#ABCD"


class RtpParseError(ValueError):
    """A datagram that is not a well-formed RTP packet; `reason` is a short metric label."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason


def is_rtcp(data: bytes) -> bool:
    """True for RTCP muxed onto the RTP port: RFC 5761 §4's test, the second byte with its top
    bit (an RTP header's marker) masked is 64..95. Also true for RTP with those forbidden payload
    types, which are then never taken for audio of some other SSRC."""
    return len(data) >= 2 and data[0] >> 6 == RTP_VERSION and data[1] & 0x7F in _RTCP_PAYLOAD_TYPES


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~0.9 µs per packet
class RtpPacket:
    payload_type: int
    marker: bool
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    csrcs: tuple[int, ...] = ()
    extension_profile: int | None = None
    extension: bytes = b""
    padding: int = 0

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        if len(data) < RTP_HEADER_LENGTH:
            raise RtpParseError("too_short", f"RTP packet of {len(data)} bytes")
        first, second, sequence, timestamp, ssrc = _HEADER.unpack_from(data)
        if first >> 6 != RTP_VERSION:
            raise RtpParseError("bad_version", f"RTP version {first >> 6}")
        if not first & 0x3F:
            # Every real G.711 tap packet: no padding, no extension, no CSRCs.
            return cls(second & 0x7F, second >> 7 == 1, sequence, timestamp, ssrc, data[12:])
        return cls._parse_full(data, first, second, sequence, timestamp, ssrc)

    @classmethod
    def _parse_full(
        cls, data: bytes, first: int, second: int, sequence: int, timestamp: int, ssrc: int
    ) -> RtpPacket:
        end = len(data)
        offset = RTP_HEADER_LENGTH

        csrc_count = first & 0x0F
        if offset + 4 * csrc_count > end:
            raise RtpParseError("csrc_past_end", f"{csrc_count} CSRCs in {end} bytes")
        csrcs = struct.unpack_from(f"!{csrc_count}I", data, offset)
        offset += 4 * csrc_count

        extension_profile: int | None = None
        extension = b""
        if first & 0x10:
            if offset + 4 > end:
                raise RtpParseError("extension_past_end", "no room for the extension header")
            extension_profile, words = _EXTENSION_HEADER.unpack_from(data, offset)
            offset += 4
            if offset + 4 * words > end:
                raise RtpParseError("extension_past_end", f"{words}-word extension")
            extension = data[offset : offset + 4 * words]
            offset += 4 * words

        padding = 0
        if first & 0x20:
            # RFC 3550 §5.1: the last octet counts the padding, itself included.
            if end <= offset:
                raise RtpParseError("padding_past_end", "no room for the padding count")
            padding = data[-1]
            if padding == 0:
                raise RtpParseError("bad_padding", "padding bit set with a zero count")
            if offset + padding > end:
                raise RtpParseError("padding_past_end", f"{padding} bytes of padding")
            end -= padding

        return cls(
            payload_type=second & 0x7F,
            marker=second >> 7 == 1,
            sequence=sequence,
            timestamp=timestamp,
            ssrc=ssrc,
            payload=data[offset:end],
            csrcs=csrcs,
            extension_profile=extension_profile,
            extension=extension,
            padding=padding,
        )

    def serialize(self) -> bytes:
        if len(self.csrcs) > 15:
            raise ValueError("at most 15 CSRCs")
        if len(self.extension) % 4:
            raise ValueError("extension length must be a multiple of 4 bytes")
        if not 0 <= self.padding <= 255:
            raise ValueError("padding must be 0..255 bytes")
        first = RTP_VERSION << 6 | len(self.csrcs)
        if self.padding:
            first |= 0x20
        if self.extension_profile is not None:
            first |= 0x10
        second = self.marker << 7 | self.payload_type
        parts = [_HEADER.pack(first, second, self.sequence, self.timestamp, self.ssrc)]
        if self.csrcs:
            parts.append(struct.pack(f"!{len(self.csrcs)}I", *self.csrcs))
        if self.extension_profile is not None:
            words = len(self.extension) // 4
            parts.append(_EXTENSION_HEADER.pack(self.extension_profile, words))
            parts.append(self.extension)
        parts.append(self.payload)
        if self.padding:
            parts.append(bytes(self.padding - 1) + bytes([self.padding]))
        return b"".join(parts)


@dataclass(frozen=True, slots=True)
class TelephoneEvent:
    """An RFC 4733 §2.3 named event payload (DTMF and friends)."""

    event: int
    end: bool
    volume: int  # -dBm0, 0..63
    duration: int  # in RTP timestamp units, since the event's start timestamp

    @classmethod
    def parse(cls, payload: bytes) -> TelephoneEvent:
        if len(payload) < 4:
            raise RtpParseError("bad_telephone_event", f"{len(payload)}-byte telephone event")
        event, flags, duration = _TELEPHONE_EVENT.unpack_from(payload)
        return cls(event=event, end=flags >> 7 == 1, volume=flags & 0x3F, duration=duration)

    def serialize(self) -> bytes:
        return _TELEPHONE_EVENT.pack(self.event, self.end << 7 | self.volume, self.duration)

    @property
    def digit(self) -> str:
        if self.event < 16:
            return _DIGITS[self.event]
        if self.event == 16:
            return "flash"
        return f"event-{self.event}"
