"""SignalWire tap over WebSocket: binary frames of raw G.711, optionally
preceded by one text frame that declares the format. Later text frames are ignored."""

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
        self.append_frames(self.fmt, data)
