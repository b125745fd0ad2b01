"""tap-receiver: the destination for live call-audio taps, recorded to per-tap WAV files."""

__version__ = "0.1.0"
