"""Audio formats named by query strings and by the optional first text frame of a tap.

A SignalWire tap may start with `{"content-type": "audio/mulaw;rate=8000"}` or with the plain text
`content-type:audio/alaw;rate=8000` (SignalWire's tap protocol); both are parsed here, purely.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from receiver.codecs.encoding import Encoding, encoding_named

SUPPORTED_RATES = (8000, 16000, 24000, 32000, 44100, 48000)


class FormatError(ValueError):
    """The text names a format, but not one we can record."""


def check_rate(encoding: Encoding, rate: int) -> None:
    """Raise FormatError unless `encoding` can be recorded at `rate`."""
    if encoding.is_g711 and rate != 8000:
        raise FormatError(f"G.711 is 8000 Hz, not {rate}")
    if rate not in SUPPORTED_RATES:
        raise FormatError(f"unsupported sample rate {rate}")


@dataclass(frozen=True, slots=True)
class AudioFormat:
    encoding: Encoding
    sample_rate: int = 8000
    channels: int = 1

    @property
    def mime(self) -> str:
        return f"{self.encoding.mime};rate={self.sample_rate}"

    @property
    def frame_bytes(self) -> int:
        """Bytes of one frame: a sample of every channel."""
        return self.encoding.bytes_per_sample * self.channels


def codec_from_query(value: str | None) -> AudioFormat:
    """`?codec=pcmu|pcma` (any case); absent means PCMU. Raises FormatError otherwise."""
    if value is None or value == "":
        return AudioFormat(Encoding.PCMU)
    encoding = encoding_named(value)
    if encoding is None or not encoding.is_g711:
        raise FormatError(f"unknown codec {value!r}: use pcmu or pcma")
    return AudioFormat(encoding)


def parse_content_type(value: str) -> AudioFormat:
    """'audio/mulaw;rate=8000' -> AudioFormat. Raises FormatError for what we cannot record."""
    mime, *params = [part.strip() for part in value.split(";")]
    encoding = encoding_named(mime)
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
    check_rate(encoding, rate)
    if channels not in (1, 2) or (encoding.is_g711 and channels != 1):
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
