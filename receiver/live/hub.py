"""The taps being listened to live, brought up to date every `live_interval`, and the counters.

A tap has a feed only while someone listens (`tap.live`); with nobody listening the hub's tick
does nothing. With `live_nats` every recording tap has one from its start, with a NatsPublisher
(nats_publisher.py) among its subscribers: then every tap is decoded for live audio. The
registry makes each feed catch up before it takes a tap's buffer for the disk and ends it with
the tap (receiver.taps.registry).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Collection
from typing import Any

from receiver.config import LiveSettings
from receiver.live.feed import LiveFeed
from receiver.live.nats_publisher import NatsLive, NatsPublisher
from receiver.live.subscriber import Subscriber
from receiver.taps.tap import Tap

log = logging.getLogger("receiver.live")
SAMPLE_FORMAT = "s16le"  # signed 16-bit little-endian, channels interleaved


class LiveHub:
    def __init__(
        self, settings: LiveSettings, gather: Callable[[Collection[Tap] | None], None]
    ) -> None:
        self.settings = settings
        self.gather = gather  # brings taps' buffers up to date (the transports' audio)
        self.feeds: dict[int, LiveFeed] = {}  # by tap serial
        self.subscribers = 0  # connected now
        self.subscriptions = 0  # in all
        self.refused: Counter[str] = Counter()  # by reason
        self._dropped_ended = 0  # frames dropped for subscribers of feeds that ended
        self._gaps_ended = 0
        self.nats: NatsLive | None = None  # with live_nats, once the fleet's NATS is set up

    @property
    def full(self) -> bool:
        return self.subscribers >= self.settings.max_subscribers

    def subscribe(self, tap: Tap, name: str, channel: int | None) -> Subscriber:
        """A new listener of an active tap; its first message says the format and position."""
        feed = self._feed(tap)
        start = {
            "type": "start",
            "name": name,
            "tap_id": tap.tap_id,
            "sample_rate": tap.sample_rate,
            "channels": 1 if channel is not None else tap.channels,
            "sample_format": SAMPLE_FORMAT,
            "position": feed.position,
        }
        max_frames = max(1, round(self.settings.queue_seconds * tap.sample_rate))
        subscriber = Subscriber(max_frames, channel, start)
        feed.subscribers.append(subscriber)
        self.subscribers += 1
        self.subscriptions += 1
        return subscriber

    def _feed(self, tap: Tap) -> LiveFeed:
        feed = self.feeds.get(tap.serial)
        if feed is None:
            feed = LiveFeed(tap, self._feed_ended)
            self.feeds[tap.serial] = feed
            tap.live = feed
        return feed

    def tap_started(self, tap: Tap) -> None:
        """A tap begins recording (TapRegistry.on_started): with live_nats, its audio goes to
        NATS from its first frame."""
        if self.nats is None:
            return
        feed = self._feed(tap)
        feed.subscribers.append(self.nats.publisher(tap, feed.position))

    def unsubscribe(self, tap: Tap, subscriber: Subscriber) -> None:
        self.subscribers -= 1
        feed = self.feeds.get(tap.serial)
        if feed is None or subscriber not in feed.subscribers:
            return  # its feed ended (its counts are in the totals already)
        feed.subscribers.remove(subscriber)
        self._dropped_ended += subscriber.dropped_frames
        self._gaps_ended += subscriber.gaps
        feed.dropped_frames -= subscriber.dropped_frames
        if not feed.subscribers:  # nobody listens: the tap goes back to costing nothing
            del self.feeds[tap.serial]
            tap.live = None

    def _feed_ended(self, feed: LiveFeed) -> None:
        self.feeds.pop(feed.tap.serial, None)
        feed.tap.live = None
        self._dropped_ended += feed.dropped_frames
        self._gaps_ended += sum(s.gaps for s in _listeners(feed))
        feed.subscribers.clear()

    def catch_up(self) -> None:
        if not self.feeds:
            return
        self.gather([feed.tap for feed in self.feeds.values()])  # only the taps listened to
        for feed in list(self.feeds.values()):
            feed.catch_up()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval)
            try:
                self.catch_up()
            except Exception:  # a bug: live audio must never stop the server
                log.exception("live audio update failed")

    def stats(self) -> dict[str, Any]:
        active = list(self.feeds.values())
        stats: dict[str, Any] = {
            "subscribers": self.subscribers,
            "taps": sum(1 for f in active if _listeners(f)),  # listened to
            "subscriptions": self.subscriptions,
            "dropped_frames": self._dropped_ended + sum(f.dropped_frames for f in active),
            "gaps": self._gaps_ended + sum(s.gaps for f in active for s in _listeners(f)),
            "refused": dict(self.refused),
        }
        if self.nats is not None:
            stats["nats"] = self.nats.health()
        return stats


def _listeners(feed: LiveFeed) -> list[Subscriber]:
    """A feed's WebSocket listeners (not its NATS publisher)."""
    return [s for s in feed.subscribers if not isinstance(s, NatsPublisher)]
