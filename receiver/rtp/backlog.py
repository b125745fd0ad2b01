"""Datagrams read ahead into the process's memory while the event loop is busy with one batch.

Creating a stream costs ~100-250 µs of Python (its tap, timeline, writer messages, a log line),
so a burst of thousands of new streams (the receiver restarted while calls are tapped, a media
server failed over) holds the loop for up to a second. Meanwhile every stream's packets wait in
the socket's kernel buffer, which the kernel caps (`net.core.rmem_max`, 4 MiB on many hosts,
and a container cannot force more) and past which it drops them: at 150k packets/s, 4 MiB
holds ~0.03 s. So while a batch takes longer than a tick, the receiver reads what waits into
copies here, with a reader of its own (the batch being handled is a view of the main reader's
buffer), up to `limit` bytes in all, and handles those copies, in order, before it reads that
socket again. The arrival times are the kernel's, so the timelines see nothing of the detour.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from receiver.rtp.datagrams import BATCH, Batch, open_reader
from receiver.rtp.stream import RtpSocket


class Backlog:
    def __init__(self, limit: int) -> None:
        self.limit = limit  # bytes of copied datagram rows, all sockets together
        self.reader = open_reader()
        self.bytes = 0
        self.datagrams = 0  # read ahead, in all (a counter)
        self.full = 0  # read-aheads the limit cut short (the kernel kept the rest)
        self._queues: dict[RtpSocket, deque[Batch]] = {}

    def __bool__(self) -> bool:
        return bool(self._queues)

    @property
    def sockets(self) -> list[RtpSocket]:
        return list(self._queues)

    def fill(self, ready: Iterable[RtpSocket]) -> None:
        """Read what waits in the `ready` sockets, while the limit allows: until a read finds
        less than a full batch (more keeps arriving: reading to the last datagram would make
        many tiny batches). Raises OSError from the socket."""
        read = self.reader.read
        for endpoint in ready:
            while self.bytes < self.limit:
                batch = read(endpoint.sock)
                if batch is None:
                    break
                copy = batch.detached()
                self._queues.setdefault(endpoint, deque()).append(copy)
                self.bytes += copy.rows.nbytes
                self.datagrams += copy.count
                if copy.count < BATCH:
                    break
            else:
                self.full += 1
                return

    def take(self, endpoint: RtpSocket) -> Batch | None:
        """The socket's oldest batch read ahead, if any."""
        queue = self._queues.get(endpoint)
        if not queue:
            return None
        batch = queue.popleft()
        if not queue:
            del self._queues[endpoint]
        self.bytes -= batch.rows.nbytes
        return batch

    def discard(self, endpoint: RtpSocket) -> None:
        """A socket closed: what was read ahead of it goes with it."""
        for batch in self._queues.pop(endpoint, ()):
            self.bytes -= batch.rows.nbytes
