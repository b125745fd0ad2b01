"""The one record of what the in-order audio case reads and changes.

Nearly every packet of a healthy stream is "the next one": the current SSRC, audio of the
current payload type, the next sequence number, a timestamp that continues where the previous
packet ended. `RtpTimeline.push` handles that case inline and `fast_lane.FastLane` takes it over
for many streams at once. Both work on this record alone: the timeline's pieces (sequencing,
placement, statistics) keep these fields here rather than in their own slots, so each exists
once in the timeline, and the lane copies the record's numeric fields into arrays keyed by their
names while it holds the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

from receiver.codecs.encoding import Encoding


@dataclass(slots=True)
class HotState:
    # What the in-order case compares against; only the general path changes these.
    payload_type: int = -1  # the current payload type if it is audio, else -1 (never one)
    codec: Encoding = Encoding.PCMU  # its encoding (meaningful while payload_type >= 0)
    ssrc: int = -1  # the current SSRC; -1 before the first packet
    anchored: bool = False  # placement: the run's first packet has fixed `offset`
    offset: int = 0  # placement: output position = extended timestamp + offset

    # What every in-order packet changes.
    next: int = 0  # sequencing: the extended sequence number due
    ref_ts: int = 0  # placement: extended timestamp of the last released audio packet
    position: int = 0  # placement: samples emitted so far (audio plus silence)
    received: int = 0  # statistics: packets taken, of any kind
    audio_ts: int = 0  # the last accepted audio packet: timestamp, samples and arrival
    audio_length: int = 0  # (interarrival jitter, and the pause at an SSRC change)
    audio_arrival: float | None = None  # None: no audio yet in this run
    interarrival_jitter: float = 0.0  # statistics: RFC 3550 A.8, in timestamp units
    last_seen: float = 0.0  # arrival of the current SSRC's last packet
