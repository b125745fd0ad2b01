"""RTP packet parsing and per-stream timeline reconstruction (pure, no I/O)."""
