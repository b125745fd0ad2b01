"""SignalWire tap over WebSocket (protocols.md §2): binary frames of raw G.711, optionally
preceded by one text frame that declares the format. Later text frames are ignored."""

from __future__ import annotations

from receiver.audio_buffer import PCM16
from receiver.audio_format import AudioFormat, parse_format_header
from receiver.dialects.base import Session, SessionContext


class RawTapSession(Session):
    dialect = "signalwire-tap"

    def __init__(self, ctx: SessionContext, fmt: AudioFormat) -> None:
        super().__init__(ctx)
        self.fmt = fmt
        self._partial = b""  # L16 frames may split a sample across messages

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
        tap = self.tap or self.start_tap(self.fmt)
        tap.count("frames_received")
        tap.count("bytes_received", len(data))
        if self.fmt.encoding == PCM16:
            data = self._partial + data
            whole = len(data) - len(data) % (2 * self.fmt.channels)
            data, self._partial = data[:whole], data[whole:]
        self.stream_buffer().append(self.fmt.encoding, data)

    def flush(self) -> None:
        if self._partial:
            self.count("bytes_discarded", len(self._partial))
            self._partial = b""
