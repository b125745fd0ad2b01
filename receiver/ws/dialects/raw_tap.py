"""SignalWire tap over WebSocket: binary frames of raw G.711 (or G.722, or L16), or one Opus
packet per binary frame, optionally preceded by one text frame that declares the format (e.g.
`audio/opus;rate=48000`). Later text frames are ignored."""

from __future__ import annotations

from receiver.codecs.formats import AudioFormat, parse_format_header
from receiver.ws.dialects.base import Session, SessionContext


class RawTapSession(Session):
    dialect = "signalwire-tap"

    def __init__(self, ctx: SessionContext, fmt: AudioFormat) -> None:
        super().__init__(ctx)
        self.fmt = fmt

    def default_format(self) -> AudioFormat:
        return self.fmt

    def text(self, data: str) -> None:
        if self.tap is None:
            declared = parse_format_header(data)  # raises FormatError for what we cannot record
            if declared is not None:
                self.fmt = declared
                self.start_tap(declared)
                self.count("format_frames")
                return
            self.start_tap(self.fmt)
        self.count("text_frames_ignored")

    def binary(self, data: bytes) -> None:
        if self.fmt.encoding.is_packetized:
            self.append_packet(self.fmt, data)
        else:
            self.append_frames(self.fmt, data)
