"""Audio formats named by query strings and by the optional first text frame of a tap.

A SignalWire tap may start with `{"content-type": "audio/mulaw;rate=8000"}` or with the plain text
`content-type:audio/alaw;rate=8000` (SignalWire's tap protocol); both are parsed here, purely.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from receiver.codecs.decoders import G722_RATE, OPUS_RATES
from receiver.codecs.encoding import Encoding, encoding_named

SUPPORTED_RATES = (8000, 16000, 24000, 32000, 44100, 48000)
# What `?codec=` takes (and what a refusal lists)
QUERY_CODECS = ("pcmu", "pcma", "opus", "g722")
SUPPORTED_FORMATS = "audio/mulaw, audio/alaw, audio/l16, audio/opus, audio/G722"


class FormatError(ValueError):
    """The text names a format, but not one we can record."""


def default_rate(encoding: Encoding) -> int:
    """The rate a tap of `encoding` is recorded at unless it declares one."""
    if encoding is Encoding.OPUS:
        return 48000
    if encoding is Encoding.G722:
        return G722_RATE
    return 8000


def check_rate(encoding: Encoding, rate: int) -> None:
    """Raise FormatError unless `encoding` can be recorded at `rate`."""
    if encoding.is_g711 and rate != 8000:
        raise FormatError(f"G.711 is 8000 Hz, not {rate}")
    if encoding is Encoding.OPUS:
        if rate not in OPUS_RATES:
            raise FormatError(f"Opus decodes at {', '.join(map(str, OPUS_RATES))} Hz, not {rate}")
        return
    if encoding is Encoding.G722:
        if rate != G722_RATE:  # (its RTP clock rate, 8000, is declared too: see parse_...)
            raise FormatError(f"G.722 is 16000 Hz audio, not {rate}")
        return
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
        """Bytes of one frame: a sample of every channel (1 for G.722, whose byte is two
        samples, and for Opus, which comes a packet at a time)."""
        if self.encoding in (Encoding.OPUS, Encoding.G722):
            return 1
        return self.encoding.bytes_per_sample * self.channels


def codec_from_query(value: str | None, rate: str | None = None) -> AudioFormat:
    """`?codec=pcmu|pcma|opus|g722` (any case), absent means PCMU; `?rate=` for Opus (48000
    unless given). Raises FormatError otherwise, naming what is supported."""
    if value is None or value == "":
        return AudioFormat(Encoding.PCMU)
    encoding = encoding_named(value)
    if encoding is None or value.strip().lower() not in QUERY_CODECS:
        raise FormatError(f"unknown codec {value!r}: supported are {', '.join(QUERY_CODECS)}")
    sample_rate = default_rate(encoding)
    if rate:
        try:
            sample_rate = int(rate)
        except ValueError:
            raise FormatError(f"bad rate {rate!r}") from None
        check_rate(encoding, sample_rate)
    return AudioFormat(encoding, sample_rate)


@dataclass(frozen=True, slots=True)
class CodecSpec:
    """A codec name with FreeSWITCH/SignalWire-style modifiers: `L16@24000h@40i` is L16 at
    24 000 Hz in 40 ms packets (`h`: the rate, `i`: the packetization interval in ms, `c`: the
    channels)."""

    name: str
    rate: int | None = None
    ptime: int | None = None
    channels: int | None = None


def parse_codec_spec(value: str) -> CodecSpec:
    """'L16@24000h@40i' -> CodecSpec('L16', 24000, 40); a plain name has no modifiers. Raises
    FormatError for a modifier that is not a number with one of the suffixes h, i, c."""
    name, *modifiers = value.strip().split("@")
    found: dict[str, int] = {}
    for modifier in modifiers:
        modifier = modifier.strip().lower()
        suffix, number = modifier[-1:], modifier[:-1]
        if suffix not in ("h", "i", "c") or not number.isdigit() or suffix in found:
            raise FormatError(f"bad codec modifier {modifier!r} in {value!r} (e.g. L16@24000h@40i)")
        found[suffix] = int(number)
    return CodecSpec(name.strip(), found.get("h"), found.get("i"), found.get("c"))


def parse_content_type(value: str) -> AudioFormat:
    """'audio/mulaw;rate=8000' -> AudioFormat. Raises FormatError for what we cannot record."""
    mime, *params = [part.strip() for part in value.split(";")]
    spec = parse_codec_spec(mime)
    mime = spec.name
    if spec.rate is not None:
        params.append(f"rate={spec.rate}")
    if spec.channels is not None:
        params.append(f"channels={spec.channels}")
    encoding = encoding_named(mime)
    if encoding is None:
        raise FormatError(f"unsupported audio format {mime!r}: supported are {SUPPORTED_FORMATS}")
    options: dict[str, str] = {}
    for param in params:
        key, _, val = param.partition("=")
        options[key.strip().lower()] = val.strip().strip('"')
    try:
        rate = int(options.get("rate", default_rate(encoding)))
        channels = int(options.get("channels", "1"))
    except ValueError:
        raise FormatError(f"bad rate or channels in {value!r}") from None
    if encoding is Encoding.G722 and rate == 8000:
        rate = G722_RATE  # the RTP clock rate SDP gives G.722 (RFC 3551 §4.5.2)
    check_rate(encoding, rate)
    mono_only = encoding.is_g711 or encoding is Encoding.G722
    if channels not in (1, 2) or (mono_only and channels != 1):
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
