"""Binary L16 forks: FreeSWITCH mod_audio_fork (`audio.drachtio.org`), jambonz
`listen` (`audio.jambonz.org`) and Vonage.

One JSON text frame first: fork metadata with `sampleRate` and `mixType` (mono, mixed, or stereo
= two interleaved channels), or Vonage's `{"event": "websocket:connected", "content-type":
"audio/l16;rate=16000"}`. Then binary 16-bit little-endian PCM, appended in arrival order (these
senders put no timestamps on the wire). Later text frames may carry DTMF; others are counted.
"""

from __future__ import annotations

from typing import Any

import orjson

from receiver.codecs.encoding import Encoding
from receiver.codecs.formats import SUPPORTED_RATES, AudioFormat, FormatError, parse_content_type
from receiver.storage.sidecar import too_deep
from receiver.ws.dialects.base import Session

FORK_SUBPROTOCOLS = ("audio.drachtio.org", "audio.jambonz.org")
_METADATA_KEYS = ("sampleRate", "mixType", "sample_rate", "mix_type")


def looks_like_fork_metadata(message: object) -> bool:
    return isinstance(message, dict) and any(key in message for key in _METADATA_KEYS)


def looks_like_vonage(message: object) -> bool:
    return isinstance(message, dict) and message.get("event") == "websocket:connected"


STEREO_CHANNELS = ("caller", "callee")  # mod_audio_fork and jambonz mixType "stereo"


def parse_fork_metadata(message: dict[str, Any]) -> AudioFormat:
    rate_value = message.get("sampleRate", message.get("sample_rate", 8000))
    try:
        rate = int(rate_value)
    except (TypeError, ValueError):
        raise FormatError(f"bad sampleRate {rate_value!r}") from None
    if rate not in SUPPORTED_RATES:
        raise FormatError(f"unsupported sample rate {rate}")
    mix = str(message.get("mixType", message.get("mix_type", "mono"))).lower()
    return AudioFormat(Encoding.L16, rate, 2 if mix == "stereo" else 1)


class L16ForkSession(Session):
    dialect = "l16-fork"

    def __init__(self, *args: Any, vonage: bool = False) -> None:
        super().__init__(*args)
        if vonage:
            self.dialect = "vonage"
        self.fmt = AudioFormat(Encoding.L16, 8000, 1)

    def default_format(self) -> AudioFormat:
        return self.fmt

    def text(self, data: str) -> None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            message = None
        if too_deep(message):
            self.bad_input("malformed_json", "a text frame nests JSON too deeply")
            message = None
        if self.tap is None:
            if looks_like_vonage(message):
                assert isinstance(message, dict)
                content_type = str(message.get("content-type") or "audio/l16;rate=16000")
                self.fmt = parse_content_type(content_type)
                if self.fmt.encoding in (Encoding.OPUS, Encoding.G722):
                    raise FormatError(f"this dialect carries L16 or G.711, not {content_type!r}")
                metadata = {k: v for k, v in message.items() if k not in ("event",)}
                self.start_tap(self.fmt, extra={"metadata": metadata})
                return
            if isinstance(message, dict):
                self.fmt = parse_fork_metadata(message)
                extra: dict[str, Any] = {"metadata": message}
                if self.fmt.channels == 2:  # mixType stereo: the caller on one, the callee on two
                    extra["channel_names"] = list(STEREO_CHANNELS)
                self.start_tap(self.fmt, extra=extra)
                return
            self.bad_input("bad_metadata", "the first text frame is not JSON metadata")
            self.start_tap(self.fmt)
            return
        if isinstance(message, dict):
            self._event(message)
        else:
            self.count("text_frames_ignored")

    def _event(self, message: dict[str, Any]) -> None:
        """DTMF as jambonz (`{"event": "dtmf", "dtmf": "5"}`) or Vonage (`websocket:dtmf`)."""
        event = str(message.get("event", ""))
        if event in ("dtmf", "websocket:dtmf"):
            digit = message.get("digit", message.get("dtmf"))
            if isinstance(digit, dict):
                digit = digit.get("digit")
            assert self.tap is not None
            record: dict[str, Any] = {
                "type": "dtmf",
                "digit": str(digit)[:16],
                "at": self.tap.buffer.frames / self.fmt.sample_rate,
            }
            if "duration" in message:
                record["duration_ms"] = message["duration"]
            self.event(record)
        else:
            self.count("text_frames_ignored")

    def binary(self, data: bytes) -> None:
        if self.tap is None:
            self.bad_input("no_metadata", "binary audio before the metadata frame; assuming 8 kHz")
        self.append_frames(self.fmt, data)  # L16, or G.711 when Vonage's content-type says so
