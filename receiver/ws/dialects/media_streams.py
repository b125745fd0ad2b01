"""Media Streams JSON, the Twilio-compatible protocol: SignalWire cXML `<Stream>`, SWML `stream`,
RELAY `calling.stream`, Twilio, Telnyx.

Text frames `connected`, `start`, `media`, `dtmf`, `mark`, `stop`. Numbers may be strings;
`streamSid` may be top-level or in `start`; Telnyx uses snake_case; `stop` may never come; media
may arrive before `start`. One track is a mono WAV; inbound and outbound together are a stereo
WAV (channel 1 inbound, channel 2 outbound), each track placed by its own chunk numbers and
timestamps on the one shared timeline (`TrackTimeline`), so the two sides stay aligned.
"""

from __future__ import annotations

import binascii
import math
import time
from typing import Any

import orjson

from receiver.codecs.decoders import G722_RATE, OPUS_RATES
from receiver.codecs.encoding import Encoding, encoding_named
from receiver.codecs.formats import (
    AudioFormat,
    FormatError,
    check_rate,
    default_rate,
    parse_codec_spec,
)
from receiver.codecs.opus_packet import OpusPacketError, packet_samples, samples_at
from receiver.storage.sidecar import too_deep
from receiver.taps.audio_buffer import AudioBuffer, ChannelBuffer
from receiver.ws.dialects.base import Session, SessionContext
from receiver.ws.track_timeline import TrackOutput, TrackTimeline

INBOUND, OUTBOUND = "inbound", "outbound"
MAX_NAME = 256  # characters of a mark's name kept in the sidecar
EARLY_MEDIA_LIMIT = 250  # media messages kept while the tracks or the format are still unknown


def looks_like_media_streams(message: object) -> bool:
    """A first text frame of this dialect: JSON with a Media Streams event."""
    return isinstance(message, dict) and message.get("event") in (
        "connected",
        "start",
        "media",
        "dtmf",
        "mark",
        "stop",
    )


def _get(obj: dict[str, Any], *names: str) -> Any:
    """The first present of several spellings (Twilio camelCase, Telnyx snake_case)."""
    for name in names:
        if name in obj and obj[name] is not None:
            return obj[name]
    return None


def _number(value: Any) -> float | None:
    """Numbers arrive as integers or as strings ("42"); anything else (also "NaN", "Infinity"
    and numbers too large for a float) is None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _track(value: Any) -> str:
    name = str(value or INBOUND).lower()
    return name.removesuffix("_track")


def parse_media_format(media_format: Any) -> AudioFormat:
    """`start.mediaFormat` / `media_format` -> AudioFormat (mono per track). The encoding may
    carry modifiers (`L16@24000h@40i`: its rate, unless `sampleRate` says otherwise)."""
    if not isinstance(media_format, dict):
        return AudioFormat(Encoding.PCMU)
    encoding_name = str(_get(media_format, "encoding") or "audio/x-mulaw").strip()
    spec = parse_codec_spec(encoding_name)
    encoding = encoding_named(spec.name)
    if encoding is None:
        raise FormatError(
            f"unsupported media format {encoding_name.lower()!r}: Media Streams carry "
            "audio/x-mulaw, audio/x-alaw, audio/x-l16 (e.g. L16@24000h@40i), audio/G722 or "
            "OPUS here"
        )
    rate_value = _number(_get(media_format, "sampleRate", "sample_rate"))
    rate = int(rate_value) if rate_value else spec.rate or default_rate(encoding)
    if encoding is Encoding.OPUS and rate not in OPUS_RATES:
        rate = default_rate(encoding)  # decoded at 48 kHz whatever the sender's input rate
    if encoding is Encoding.G722 and rate == 8000:
        rate = G722_RATE  # the RTP clock rate SDP gives G.722 (RFC 3551 §4.5.2)
    check_rate(encoding, rate)
    return AudioFormat(encoding, rate, 1)


class OpusTrack:
    """A track's output for Opus: one packet per media message, and a hole is audio that was
    lost (concealed by libopus), not silence."""

    __slots__ = ("buffer", "rate")

    def __init__(self, buffer: AudioBuffer, rate: int) -> None:
        self.buffer = buffer
        self.rate = rate

    def append(self, encoding: Encoding, data: bytes) -> None:
        self.buffer.append_packet(encoding, data, samples_at(packet_samples(data), self.rate))

    def append_silence(self, frames: int) -> None:
        self.buffer.append_lost(Encoding.OPUS, frames)


class MediaStreamsSession(Session):
    dialect = "media-streams"
    # Seconds since the stream began bound how far its tracks may reach (TrackTimeline.horizon);
    # a replay of a recorded session, faster than real time, replaces this clock.
    clock = staticmethod(time.monotonic)

    def __init__(self, ctx: SessionContext) -> None:
        super().__init__(ctx)
        self.fmt: AudioFormat | None = None
        self.tracks: list[str] | None = None  # from `start`, else from the media seen
        self.timelines: dict[str, TrackTimeline] = {}
        self.info: dict[str, Any] = {}
        self._early: list[tuple[str, float | None, float | None, bytes]] = []
        self._seen_tracks: list[str] = []
        self._l16 = Encoding.L16BE if ctx.settings.stream_l16_big_endian else Encoding.L16
        self._started = self.clock()

    # -- frames -------------------------------------------------------------------------------

    def text(self, data: str) -> None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.bad_input("malformed_json", "a text frame is not JSON")
            return
        if not isinstance(message, dict):
            self.bad_input("malformed_json", "a text frame is not a JSON object")
            return
        if too_deep(message):
            self.bad_input("malformed_json", "a text frame nests JSON too deeply")
            return
        self.count("messages")
        event = message.get("event")
        handler = {
            "media": self._media,
            "start": self._start,
            "connected": self._connected,
            "dtmf": self._dtmf,
            "mark": self._mark,
            "stop": self._stop,
        }.get(event if isinstance(event, str) else "")
        if handler is None:
            self.bad_input("unknown_event", f"unknown event {str(event)[:40]!r}")
            return
        handler(message)

    def _connected(self, message: dict[str, Any]) -> None:
        for key in ("protocol", "version"):
            if key in message:
                self.info[key] = message[key]

    def _start(self, message: dict[str, Any]) -> None:
        start = message.get("start")
        if not isinstance(start, dict):
            start = {}
        if self.tap is not None and "stream_sid" in self.info:
            self.bad_input("duplicate_start", "a second start event")
            return
        info = self.info
        info["stream_sid"] = _get(start, "streamSid", "stream_id") or _get(
            message, "streamSid", "stream_id"
        )
        info["call_sid"] = _get(start, "callSid", "call_sid", "call_control_id")
        info["account_sid"] = _get(start, "accountSid", "account_sid")
        info["custom_parameters"] = _get(start, "customParameters", "custom_parameters") or {}
        media_format = _get(start, "mediaFormat", "media_format")
        info["media_format"] = media_format
        tracks = _get(start, "tracks")
        if isinstance(tracks, str):
            tracks = [tracks]
        if isinstance(tracks, list) and tracks:
            names = [_track(t) for t in tracks]
            if any("both" in n for n in names):
                names = [INBOUND, OUTBOUND]
            self.tracks = [t for t in (INBOUND, OUTBOUND) if t in names] or names[:1]
        fmt = parse_media_format(media_format)  # FormatError: refuse the stream (1003)
        if self.tap is None:
            self.fmt = fmt
            if self.tracks is not None:
                self._begin()
        elif fmt != self.fmt:
            self.bad_input("late_start_format", "start came after media with another format")

    def _media(self, message: dict[str, Any]) -> None:
        media = message.get("media")
        if not isinstance(media, dict):
            self.bad_input("bad_media", "media event without a media object")
            return
        payload = media.get("payload")
        try:
            audio = binascii.a2b_base64(payload) if isinstance(payload, str) else None
        except (binascii.Error, ValueError):
            audio = None
        if audio is None:
            self.bad_input("bad_base64", "media payload is not base64")
            return
        track = _track(media.get("track"))
        chunk = _number(media.get("chunk"))
        timestamp = _number(media.get("timestamp"))
        self.heard()
        if self.tap is None:
            if track not in self._seen_tracks:  # bounded: only until the tap begins
                self._seen_tracks.append(track)
            self._early.append((track, chunk, timestamp, audio))
            both_seen = INBOUND in self._seen_tracks and OUTBOUND in self._seen_tracks
            if both_seen or len(self._early) >= EARLY_MEDIA_LIMIT:
                self._begin()
            return
        self._place(track, chunk, timestamp, audio)

    def _dtmf(self, message: dict[str, Any]) -> None:
        dtmf = message.get("dtmf") if isinstance(message.get("dtmf"), dict) else {}
        assert isinstance(dtmf, dict)
        digit = _get(dtmf, "digit")
        if digit is None:
            self.bad_input("bad_dtmf", "dtmf event without a digit")
            return
        event: dict[str, Any] = {"type": "dtmf", "digit": str(digit)[:16], "at": self._now()}
        duration = _number(_get(dtmf, "duration"))
        if duration is not None:
            event["duration_ms"] = duration
        if "track" in dtmf:
            event["track"] = _track(dtmf["track"])
        self.event(event)

    def _mark(self, message: dict[str, Any]) -> None:
        mark = message.get("mark") if isinstance(message.get("mark"), dict) else {}
        assert isinstance(mark, dict)
        name = mark.get("name")
        self.event({"type": "mark", "name": str(name)[:MAX_NAME] if name is not None else None,
                    "at": self._now()})  # fmt: skip

    def _stop(self, message: dict[str, Any]) -> None:
        self.info["stopped"] = True
        self.event({"type": "stop", "at": self._now()})

    # -- timeline -----------------------------------------------------------------------------

    def _now(self) -> float:
        """Seconds into the recording: how far the furthest track has got."""
        if not self.timelines or self.fmt is None:
            return 0.0
        return max(t.reach for t in self.timelines.values()) / self.fmt.sample_rate

    def _begin(self) -> None:
        """Start the tap now that the tracks (and hopefully the format) are known."""
        fmt = self.fmt or AudioFormat(Encoding.PCMU)
        self.fmt = fmt
        if self.tracks is None:
            seen = [t for t in (INBOUND, OUTBOUND) if t in self._seen_tracks]
            self.tracks = seen or self._seen_tracks[:1] or [INBOUND]
        channels = len(self.tracks)
        buffer: AudioBuffer | ChannelBuffer = (
            ChannelBuffer(channels) if channels > 1 else AudioBuffer(1)
        )
        buffers = buffer.channel_buffers if isinstance(buffer, ChannelBuffer) else [buffer]
        outputs: list[TrackOutput] = list(buffers)
        if fmt.encoding is Encoding.OPUS:
            outputs = [OpusTrack(b, fmt.sample_rate) for b in buffers]
        window = self.ctx.settings.stream_jitter_ms * fmt.sample_rate // 1000
        self.timelines = {
            track: TrackTimeline(output, fmt.sample_rate, window)
            for track, output in zip(self.tracks, outputs, strict=True)
        }
        split = self.ctx.settings.stream_split_tracks and channels > 1
        self.start_tap(
            AudioFormat(fmt.encoding, fmt.sample_rate, channels),
            buffer=buffer,
            track_files=list(self.tracks) if split else None,
            extra={"stream": self.info, "tracks": {}, "channel_names": list(self.tracks)},
        )
        early, self._early = self._early, []
        for track, chunk, timestamp, audio in early:
            self._place(track, chunk, timestamp, audio)

    def _place(
        self, track: str, chunk: float | None, timestamp: float | None, audio: bytes
    ) -> None:
        timeline = self.timelines.get(track)
        if timeline is None:
            self.bad_input("unexpected_track", f"media for track {track!r} not in {self.tracks}")
            return
        assert self.fmt is not None and self.tap is not None
        kind = self.fmt.encoding
        if kind is Encoding.L16:
            kind = self._l16
            if len(audio) % 2:
                self.bad_input("bad_payload_length", "L16 payload of an odd number of bytes")
                audio = audio[:-1]
        if kind is Encoding.OPUS:
            try:
                packet_samples(audio)
            except OpusPacketError as exc:  # its time becomes a hole: concealed by libopus
                self.bad_input("corrupt_packets", f"not an Opus packet: {exc}; concealed")
                return
        self.tap.count("media_messages")
        elapsed = self.clock() - self._started
        timeline.horizon = round(elapsed * timeline.rate) + timeline.max_gap
        timeline.add(None if chunk is None else int(chunk), timestamp, kind, audio)
        if len(self.timelines) > 1:
            self._align(timeline)

    def _align(self, moved: TrackTimeline) -> None:
        """A track that falls far behind the other (stalled, or silent with no messages) is
        padded with silence, so what waits to be interleaved stays bounded."""
        lag_limit = 2 * moved.window + moved.rate  # window plus a second of slack
        lead = moved.end
        for timeline in self.timelines.values():
            if lead - timeline.end > lag_limit:
                timeline.pad_to(lead - lag_limit)

    def flush(self) -> None:
        if self.tap is None and (self._early or self.fmt is not None):
            self._begin()
        for timeline in self.timelines.values():
            timeline.flush()
        if len(self.timelines) > 1:  # the channels end together
            end = max(t.end for t in self.timelines.values())
            for timeline in self.timelines.values():
                timeline.pad_to(end)
        if self.tap is not None:
            self.tap.extra["tracks"] = {
                track: timeline.stats.to_dict() for track, timeline in self.timelines.items()
            }

    def default_format(self) -> AudioFormat:
        return self.fmt or AudioFormat(Encoding.PCMU)
