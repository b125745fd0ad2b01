"""How long an Opus packet plays, from its table-of-contents byte (RFC 6716 §3.1), purely.

The event loop needs each packet's duration to keep a tap's timeline (the samples it adds) before
the packet is decoded, which happens later in the disk writer; and a packet whose TOC is not
valid is counted and concealed there and then. Durations are in samples at 48 kHz, Opus's
internal clock (and its RTP clock, RFC 7587).
"""

from __future__ import annotations

# Frame durations in 48 kHz samples by TOC configuration (bits 3-7): SILK-only 10/20/40/60 ms,
# hybrid 10/20 ms, CELT-only 2.5/5/10/20 ms.
_FRAME_SAMPLES = [480, 960, 1920, 2880] * 3 + [480, 960] * 2 + [120, 240, 480, 960] * 4
MAX_PACKET_SAMPLES = 5760  # 120 ms: no packet may play longer (RFC 6716 §3.2.5)


class OpusPacketError(ValueError):
    """Not an Opus packet: empty, or its TOC says something impossible."""


def packet_samples(packet: bytes) -> int:
    """Samples (per channel, at 48 kHz) that `packet` decodes to. Raises OpusPacketError."""
    if not packet:
        raise OpusPacketError("empty packet")
    toc = packet[0]
    per_frame = _FRAME_SAMPLES[toc >> 3]
    code = toc & 0x03
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        if len(packet) < 2:
            raise OpusPacketError("code 3 packet without its frame count")
        frames = packet[1] & 0x3F
        if frames == 0:
            raise OpusPacketError("code 3 packet of zero frames")
    samples = frames * per_frame
    if samples > MAX_PACKET_SAMPLES:
        raise OpusPacketError(f"packet of {samples / 48:g} ms (at most 120)")
    return samples


def samples_at(samples_48k: int, rate: int) -> int:
    """48 kHz samples -> samples at a decoder rate (8, 12, 16, 24 or 48 kHz: always whole)."""
    return samples_48k * rate // 48000
