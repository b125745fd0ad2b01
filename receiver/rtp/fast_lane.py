"""The vectorised path for in-order RTP audio: one set of numpy operations per batch of datagrams
instead of Python per packet.

Nearly every packet of a healthy G.711 stream is "the next one": the same SSRC and payload
type, the next sequence number, a timestamp that continues exactly where the previous packet
ended, no packets held for reordering. The timeline stays the one authority on what the rules
are: a stream is *armed* only while its timeline reports that state (`RtpTimeline.hot_state`),
and then the lane keeps the numeric fields of that record (`HotState`) in arrays keyed by their
names (the record is stale until `sync`). Any other packet, or anyone about to read or change
the timeline, disarms the stream first (`disarm` writes the fields back, if the lane applied a
packet since it armed); after a packet the general path handled, `arm` tries again. A packet
qualifies only if its stream has no other packet in the batch, so packets of one stream are
always applied in arrival order.

The audio of applied packets is copied into a per-slot store (one row of a 2-D array, one numpy
scatter per batch) and handed to the tap's buffer as one chunk when the store is full, when the
stream is synced or disarmed, and before its tap is flushed (`drain`, `drain_all`): no call into
the buffer per packet, and the buffer sees audio in exactly the order the timeline made it.

The equivalence with the general path is a property test (tests/test_fuzz_fast_lane.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from operator import attrgetter
from typing import Any

import numpy as np

from receiver.codecs.encoding import Encoding
from receiver.rtp.datagrams import Batch
from receiver.rtp.timeline import HotState, RtpTimeline

STORE_BYTES = 8192  # per slot: ~1 s of 8 kHz G.711, drained when full (or at each flush)


def store_bytes_for(flush_interval: float) -> int:
    """A slot's store that holds one flush of 8 kHz G.711 (a packet's worth at least, 64 KiB at
    most, a multiple of 16 bytes): the tap's buffer then gets about one chunk per flush."""
    return min(65536, max(1024, round(8000 * flush_interval * 1.024))) & ~15


# The record's numeric fields, one array row each. (`codec` is kept per slot; `anchored` is true
# for every armed stream and the in-order case never changes it.)
INT_FIELDS = tuple(f.name for f in fields(HotState) if f.type == "int")
FLOAT_FIELDS = tuple(f.name for f in fields(HotState) if f.type in ("float", "float | None"))


def _setter(names: tuple[str, ...]) -> Callable[[HotState, list[Any]], None]:
    """`setter(state, values)` assigns `values` to the fields `names` of `state`: one tuple
    unpacking, generated from the names as dataclasses generates `__init__` (a loop of setattr
    costs ~6x more, and `sync` runs on every general-path packet of an armed stream)."""
    namespace: dict[str, Any] = {}
    targets = "".join(f"state.{name}, " for name in names)
    exec(f"def setter(state, values):\n    {targets}= values\n", namespace)
    setter: Callable[[HotState, list[Any]], None] = namespace["setter"]
    return setter


_get_ints, _get_floats = attrgetter(*INT_FIELDS), attrgetter(*FLOAT_FIELDS)
_set_ints, _set_floats = _setter(INT_FIELDS), _setter(FLOAT_FIELDS)


def _field(header: np.ndarray, offset: int, dtype: str) -> np.ndarray:
    """Each row's field of `dtype` at `offset` of a contiguous (n, 12) header array, as int64."""
    size = np.dtype(dtype).itemsize
    return header[:, offset : offset + size].view(dtype)[:, 0].astype(np.int64)


class FastLane:
    def __init__(self, capacity: int = 64, store_bytes: int = STORE_BYTES) -> None:
        self.capacity = 0
        self.store_bytes = store_bytes
        self.armed = np.zeros(0, dtype=bool)
        self._applied = np.zeros(0, dtype=bool)  # a packet applied since `arm` or `sync`
        # One row per numeric field of HotState, one column per slot: a slot's fields are read
        # with one numpy call (`sync` and `arm` run on every general-path packet of an armed
        # stream, which under loss is most of them).
        self._int_rows = np.zeros((len(INT_FIELDS), 0), np.int64)
        self._float_rows = np.zeros((len(FLOAT_FIELDS), 0))
        self.ints: dict[str, np.ndarray] = {}  # views of the rows, by field name
        self.floats: dict[str, np.ndarray] = {}
        self._states: list[HotState | None] = []  # the armed timelines' records
        self._store = np.zeros((0, store_bytes), np.uint8)  # audio not yet in the tap's buffer
        self._fill = np.zeros(0, np.int64)  # bytes used in each slot's row of _store
        self._append: list[Callable[[Encoding, bytes], None] | None] = []
        self._codec: list[Encoding] = []
        self._free: list[int] = []
        self._slot_of_key: dict[int, int] = {}
        self._sorted_keys = np.zeros(0, dtype=np.uint64)
        self._sorted_slots = np.zeros(0, dtype=np.int64)
        self._stale_index = False
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        self.armed = np.concatenate([self.armed, np.zeros(capacity - old, dtype=bool)])
        self._applied = np.concatenate([self._applied, np.zeros(capacity - old, dtype=bool)])
        self._int_rows = np.concatenate(
            [self._int_rows, np.zeros((len(INT_FIELDS), capacity - old), np.int64)], axis=1
        )
        self._float_rows = np.concatenate(
            [self._float_rows, np.zeros((len(FLOAT_FIELDS), capacity - old))], axis=1
        )
        self.ints = dict(zip(INT_FIELDS, self._int_rows, strict=True))
        self.floats = dict(zip(FLOAT_FIELDS, self._float_rows, strict=True))
        self._states += [None] * (capacity - old)
        # The store is megabytes: the new rows are left unwritten (a row's bytes past its fill
        # are never read), so growing copies the old rows once and touches nothing else.
        store = np.empty((capacity, self.store_bytes), np.uint8)
        store[:old] = self._store
        self._store = store
        self._fill = np.concatenate([self._fill, np.zeros(capacity - old, np.int64)])
        self._store_view = self._store.data.cast("B")
        # The same memory as 32-bit words (when a row is a whole number of them): see _store_audio
        self._store_words = self._store.reshape(-1)[: self._store.size & ~3].view(np.uint32)
        self._append += [None] * (capacity - old)
        self._codec += [Encoding.PCMU] * (capacity - old)
        self._free += range(capacity - 1, old - 1, -1)
        self.capacity = capacity

    # -- slots -------------------------------------------------------------------------------

    def add(self, key: int) -> int:
        """A slot for the source `key` (a non-zero lane key of datagrams.Batch)."""
        if not self._free:
            self._grow(self.capacity * 2)
        slot = self._free.pop()
        self._slot_of_key[key] = slot
        self._stale_index = True
        return slot

    def remove(self, key: int, slot: int) -> None:
        self.drain(slot)
        self.armed[slot] = self._applied[slot] = False
        self._states[slot] = self._append[slot] = None
        if self._slot_of_key.get(key) == slot:
            del self._slot_of_key[key]
            self._stale_index = True
        self._free.append(slot)

    def arm(
        self, slot: int, timeline: RtpTimeline, append: Callable[[Encoding, bytes], None]
    ) -> None:
        """Take over the timeline's in-order case, if it is in it now; `append` gets the audio."""
        if self.armed[slot]:
            return
        state = timeline.hot_state()
        if state is None:
            return
        self._int_rows[:, slot] = _get_ints(state)
        self._float_rows[:, slot] = _get_floats(state)
        self._states[slot] = state
        self._append[slot] = append
        self._codec[slot] = state.codec
        self.armed[slot] = True

    def drain(self, slot: int) -> None:
        """Hand the slot's stored audio to its tap's buffer."""
        fill = int(self._fill[slot])
        if fill:
            append = self._append[slot]
            assert append is not None
            append(self._codec[slot], self._store[slot, :fill].tobytes())
            self._fill[slot] = 0

    def drain_all(self) -> None:
        """Every slot's stored audio to its tap's buffer (before the buffers are taken)."""
        for slot in np.flatnonzero(self._fill).tolist():
            self.drain(slot)

    def sync(self, slot: int) -> None:
        """Write the lane's fields back into the timeline's record and its audio into the buffer
        (it stays armed)."""
        state = self._states[slot]
        if not self.armed[slot] or state is None:
            return
        self.drain(slot)
        if self._applied[slot]:
            self._applied[slot] = False
            _set_ints(state, self._int_rows[:, slot].tolist())
            _set_floats(state, self._float_rows[:, slot].tolist())

    def disarm(self, slot: int) -> None:
        self.sync(slot)
        self.armed[slot] = False

    def last_seen(self, slot: int) -> float | None:
        return float(self.floats["last_seen"][slot]) if self.armed[slot] else None

    def last_seen_all(self) -> list[float]:
        """Per slot: the arrival of the last packet the lane applied (-inf if not armed)."""
        seen: list[float] = np.where(self.armed, self.floats["last_seen"], -np.inf).tolist()
        return seen

    # -- the batch ---------------------------------------------------------------------------

    def _index(self) -> None:
        keys = np.fromiter(self._slot_of_key.keys(), np.uint64, len(self._slot_of_key))
        slots = np.fromiter(self._slot_of_key.values(), np.int64, len(self._slot_of_key))
        order = np.argsort(keys)
        self._sorted_keys, self._sorted_slots = keys[order], slots[order]
        self._stale_index = False

    def process(self, batch: Batch) -> np.ndarray:
        """Apply every qualifying datagram of the batch; returns the mask of those applied."""
        count = batch.count
        if self._stale_index:
            self._index()
        keys = self._sorted_keys
        if not keys.size or not self.armed.any():
            return np.zeros(count, dtype=bool)
        place = np.minimum(np.searchsorted(keys, batch.lane_keys), keys.size - 1)
        known = keys[place] == batch.lane_keys
        slots = np.where(known, self._sorted_slots[place], 0)
        rows, lengths = batch.rows, batch.lengths
        ints = self.ints
        ok: np.ndarray = known & self.armed[slots] & (rows[:, 0] == 0x80)
        ok &= (lengths > 12) & (lengths <= 12 + self.store_bytes)
        ok &= rows[:, 1] == ints["payload_type"][slots]  # and the marker bit clear
        # One packet per stream per batch: then applying them together keeps each stream's order.
        ok &= np.bincount(slots[known], minlength=self.capacity)[slots] == 1
        if not ok.any():
            return ok
        header = rows[:, :12].copy()  # contiguous: its fields can be viewed as big-endian words
        sequence = _field(header, 2, ">u2")
        timestamp = _field(header, 4, ">u4")
        ssrc = _field(header, 8, ">u4")
        ok &= (ssrc == ints["ssrc"][slots]) & (sequence == ints["next"][slots] & 0xFFFF)
        ref = ints["ref_ts"][slots]
        ext = ref + ((timestamp - ref + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        ok &= ext + ints["offset"][slots] == ints["position"][slots]  # no gap, no overlap
        index = np.flatnonzero(ok)
        if not index.size:
            return ok
        s = slots[index]
        arrival = batch.arrivals[index]
        ts = timestamp[index]
        samples = lengths[index] - 12
        floats = self.floats
        # RFC 3550 A.8, exactly as RtpTimeline computes it (same float64 operations).
        advance = ((ts - ints["audio_ts"][s] + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        d = (arrival - floats["audio_arrival"][s]) * 8000 - advance
        jitter = floats["interarrival_jitter"][s]
        floats["interarrival_jitter"][s] = jitter + (np.abs(d) - jitter) / 16.0
        floats["audio_arrival"][s] = arrival
        floats["last_seen"][s] = arrival
        ints["audio_ts"][s] = ts
        ints["audio_length"][s] = samples
        ints["ref_ts"][s] = ext[index]
        ints["next"][s] += 1
        ints["position"][s] += samples
        ints["received"][s] += 1
        self._applied[s] = True
        self._store_audio(s, rows, index, samples)
        return ok

    def _store_audio(
        self, slots: np.ndarray, rows: np.ndarray, index: np.ndarray, lengths: np.ndarray
    ) -> None:
        """Copy the payload (after the 12-byte header) of each `rows[index]` to the end of its
        slot's store; a store without room is drained first. Each slot appears at most once.

        The usual batch (payloads of one length, a multiple of 4 bytes: G.711 at any ptime)
        is copied by one numpy scatter of 32-bit words, ~2x cheaper than a memoryview slice
        assignment per packet (~0.3 µs per 160 bytes), which copies any other batch."""
        fill, size = self._fill, self.store_bytes
        full = fill[slots] + lengths > size
        if full.any():
            for slot in slots[full].tolist():
                self.drain(slot)
        targets = slots * size + fill[slots]
        length = int(lengths[0])
        words = length >> 2
        if (
            length & 3 == 0
            and rows.flags.c_contiguous
            and rows.shape[1] & 3 == 0
            and not (lengths != length).any()
            and not (targets & 3).any()
        ):
            source = rows.view(np.uint32)[index, 3 : 3 + words]  # the payload starts at word 3
            self._store_words[(targets >> 2)[:, None] + np.arange(words)] = source
        else:
            store, source_bytes, width = self._store_view, rows.data.cast("B"), rows.shape[1]
            starts = (index * width + 12).tolist()
            for target, start, n in zip(targets.tolist(), starts, lengths.tolist(), strict=True):
                store[target : target + n] = source_bytes[start : start + n]
        fill[slots] += lengths
