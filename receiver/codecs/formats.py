"""Audio formats named by query strings and by the optional first text frame of a tap.

A SignalWire tap may start with `{"content-type": "audio/mulaw;rate=8000"}` or with the plain text
`content-type:audio/alaw;rate=8000` (protocols.md §2.2); both are parsed here, purely.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from receiver.codecs import g711
from receiver.taps.audio_buffer import PCM16

_ENCODINGS = {
    "audio/mulaw": g711.PCMU,
    "audio/x-mulaw": g711.PCMU,
    "audio/ulaw": g711.PCMU,
    "audio/x-ulaw": g711.PCMU,
    "audio/pcmu": g711.PCMU,
    "audio/basic": g711.PCMU,
    "audio/alaw": g711.PCMA,
    "audio/x-alaw": g711.PCMA,
    "audio/pcma": g711.PCMA,
    "audio/l16": PCM16,
    "audio/x-l16": PCM16,
}
SUPPORTED_RATES = (8000, 16000, 24000, 32000, 44100, 48000)


class FormatError(ValueError):
    """The text names a format, but not one we can record."""


@dataclass(frozen=True, slots=True)
class AudioFormat:
    encoding: str  # g711.PCMU, g711.PCMA or PCM16
    sample_rate: int = 8000
    channels: int = 1

    @property
    def mime(self) -> str:
        names = {g711.PCMU: "audio/mulaw", g711.PCMA: "audio/alaw", PCM16: "audio/l16"}
        return f"{names[self.encoding]};rate={self.sample_rate}"


def codec_from_query(value: str | None) -> AudioFormat:
    """`?codec=pcmu|pcma` (any case); absent means PCMU. Raises FormatError otherwise."""
    if value is None or value == "":
        return AudioFormat(g711.PCMU)
    name = value.strip().upper()
    if name not in g711.CODECS:
        raise FormatError(f"unknown codec {value!r}: use pcmu or pcma")
    return AudioFormat(name)


def parse_content_type(value: str) -> AudioFormat:
    """'audio/mulaw;rate=8000' -> AudioFormat. Raises FormatError for what we cannot record."""
    mime, *params = [part.strip() for part in value.split(";")]
    encoding = _ENCODINGS.get(mime.lower())
    if encoding is None:
        raise FormatError(f"unsupported audio format {mime!r}")
    options: dict[str, str] = {}
    for param in params:
        key, _, val = param.partition("=")
        options[key.strip().lower()] = val.strip().strip('"')
    try:
        rate = int(options.get("rate", "8000"))
        channels = int(options.get("channels", "1"))
    except ValueError:
        raise FormatError(f"bad rate or channels in {value!r}") from None
    if encoding != PCM16 and rate != 8000:
        raise FormatError(f"G.711 is 8000 Hz, not {rate}")
    if rate not in SUPPORTED_RATES:
        raise FormatError(f"unsupported sample rate {rate}")
    if channels not in (1, 2) or (encoding != PCM16 and channels != 1):
        raise FormatError(f"unsupported channel count {channels} for {mime}")
    return AudioFormat(encoding, rate, channels)


def parse_format_header(text: str) -> AudioFormat | None:
    """A tap's first text frame: JSON {"content-type": ...} / {"format": ...} or the plain text
    'content-type:audio/...'. None when the text does not declare a format at all."""
    text = text.strip()
    value: object = None
    if text.startswith("{"):
        try:
            data = orjson.loads(text)  # refuses nesting past 1024 levels (no RecursionError)
        except orjson.JSONDecodeError:
            return None
        if isinstance(data, dict):
            lowered = {str(k).lower(): v for k, v in data.items()}
            value = lowered.get("content-type") or lowered.get("contenttype")
            value = value or lowered.get("format")
    else:
        key, sep, rest = text.partition(":")
        if sep and key.strip().lower() == "content-type":
            value = rest
        elif text.lower().startswith("audio/"):
            value = text
    if not isinstance(value, str) or not value.strip():
        return None
    return parse_content_type(value.strip())
