"""RTP taps: UDP sockets read in batches, per-source streams, packet parsing, the per-stream
timeline and the vectorised fast lane for in-order audio."""
