"""Live audio: a tap's decoded audio for listeners while it is recorded (`/api/taps/{name}/live`).

`feed.py` reads a tap's buffer as its timeline fills it (without taking it from the disk writer),
`subscriber.py` is one listener's bounded queue (what does not fit is dropped, counted and told
as a gap), `hub.py` keeps the feeds and the counters and brings them up to date every
`live_interval`, `endpoint.py` is the WebSocket that carries it.
"""
