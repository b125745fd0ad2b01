"""Is G.711 audio the law it is declared as? A-law sent to a tap that expects µ-law (or the
reverse) decodes to loud noise, and nothing else says so.

The two laws' byte statistics differ strongly where audio is quiet, and calls are quiet much of
the time (pauses, between words, the far end listening): µ-law silence is 0xFF/0x7F, A-law
silence 0xD5/0x55, and the bytes of one law's quiet samples decode, in the other law, to
samples of about -38 to -26 dBFS, never below. So over the first seconds of a tap, the bytes that
are quiet (|sample| <= QUIET) read as declared are counted, and those quiet read as the other
law. A mix-up has many more of the second: most of the bytes where the line is quiet, or, in
speech, a good share of them, and then reading it as the other law also gives the more
correlated signal (audio is correlated from sample to sample; decoding with the wrong law
scrambles magnitudes and lowers it). Random bytes, a steady tone or loud noise say nothing; a
verdict is only "likely".

Pure, cheap (two table look-ups per byte, of the first CHECK_BYTES only); the disk writer feeds
it each batch. Detection only: the audio is recorded as declared, never rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from receiver.codecs.encoding import Encoding

QUIET = 256  # |sample| at or below this (-42 dBFS) is quiet
MIN_BYTES = 8000  # a verdict needs a second of 8 kHz audio
CHECK_BYTES = 80_000  # and is given up after ten seconds of it
# A verdict takes either quiet that mostly the other law finds (silence, a quiet line) where
# the declared law does not give the more correlated signal...
QUIET_ONLY_SHARE = 0.5  # the other law finds at least this share of the bytes quiet
QUIET_ONLY_RATIO = 5  # and this many times the share the declared law finds
VETO = 0.1  # unless |lag-1 correlation| read as declared is higher by this much
# ...or some quiet that mostly the other law finds, in a signal it makes more correlated
MIN_QUIET_SHARE = 0.2
RATIO = 2
MIN_CORRELATION = 0.3  # |lag-1 correlation| read as the other law, at least
MORE_CORRELATED = 0.05  # and by this much more than read as declared

QUIET_SAMPLE = 2048  # bytes of each batch that are counted
CORRELATION_SAMPLE = 256  # bytes of each batch kept, for a correlation only if one is needed

_LAWS = (Encoding.PCMU, Encoding.PCMA)
_VALUES = {law: law.decode(bytes(range(256))).astype(np.float64) for law in _LAWS}
_QUIET = {law: (np.abs(values) <= QUIET).astype(np.int64) for law, values in _VALUES.items()}
_OTHER = {Encoding.PCMU: Encoding.PCMA, Encoding.PCMA: Encoding.PCMU}
# Per declared law, a byte's (quiet as declared, quiet as the other law): one product counts both
_QUIET_BOTH = {law: np.stack([_QUIET[law], _QUIET[_OTHER[law]]], axis=1) for law in _LAWS}


@dataclass(frozen=True, slots=True)
class LawMismatch:
    declared: Encoding
    likely: Encoding
    quiet_as_declared: float  # share of the bytes checked
    quiet_as_likely: float

    @property
    def message(self) -> str:
        names = {Encoding.PCMU: "µ-law (PCMU)", Encoding.PCMA: "A-law (PCMA)"}
        return (
            f"the audio looks like {names[self.likely]}, not the declared "
            f"{names[self.declared]}: it is recorded as declared and will sound like loud "
            f"noise; have the sender declare {self.likely} (e.g. ?codec={self.likely.lower()})"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "declared": self.declared.value,
            "likely": self.likely.value,
            "quiet_share": {
                self.declared.value: round(self.quiet_as_declared, 3),
                self.likely.value: round(self.quiet_as_likely, 3),
            },
            "message": self.message,
        }


class _Moments:
    """Running sums for the lag-1 correlation of a signal fed in pieces (pairs across pieces
    are left out)."""

    __slots__ = ("n", "pairs", "product", "square", "total")

    def __init__(self) -> None:
        self.n = self.pairs = 0
        self.total = self.square = self.product = 0.0

    def add(self, x: np.ndarray) -> None:
        self.n += len(x)
        self.pairs += len(x) - 1
        self.total += float(x.sum())
        self.square += float(np.dot(x, x))
        self.product += float(np.dot(x[:-1], x[1:]))

    @property
    def correlation(self) -> float:
        if self.pairs < 1:
            return 0.0
        mean = self.total / self.n
        variance = self.square / self.n - mean * mean
        if variance <= 1e-9:
            return 0.0  # a constant (digital silence, either way): no evidence
        return (self.product / self.pairs - mean * mean) / variance


class LawCheck:
    """Feed it a tap's G.711 bytes as they are written; `done` once it has a verdict or has
    seen enough; `mismatch` is the verdict (None: nothing suspicious)."""

    __slots__ = (
        "_declared",
        "_quiet_declared",
        "_quiet_other",
        "_samples",
        "counted",
        "done",
        "fed",
        "mismatch",
    )

    def __init__(self) -> None:
        self.fed = 0  # bytes fed (the time checked, at 8 kHz)
        self.counted = 0  # of them, bytes counted (a sample of each batch)
        self._quiet_declared = 0
        self._quiet_other = 0
        self._declared: dict[Encoding, int] = {}  # bytes counted per declared law
        self._samples: list[tuple[Encoding, np.ndarray]] = []  # for the correlation
        self.done = False
        self.mismatch: LawMismatch | None = None

    def feed(self, encoding: Encoding, data: bytes) -> None:
        """A batch (or a run of it) of one encoding. A few µs whatever its length: feed
        whole batches, not packets."""
        if self.done or not data:
            return
        if encoding not in _OTHER:  # L16: nothing to check, now or later
            self.done = True
            return
        self.fed += len(data)
        codes = np.frombuffer(data, dtype=np.uint8)
        if len(codes) > QUIET_SAMPLE:  # spread over the batch, not its first moments only
            codes = codes[:: -(-len(codes) // QUIET_SAMPLE)]
        self.counted += len(codes)
        self._declared[encoding] = self._declared.get(encoding, 0) + len(codes)
        counts = np.bincount(codes, minlength=256)  # how often each byte: one pass
        quiet_declared, quiet_other = (counts @ _QUIET_BOTH[encoding]).tolist()
        self._quiet_declared += quiet_declared
        self._quiet_other += quiet_other
        whole = np.frombuffer(data, dtype=np.uint8, count=min(len(data), CORRELATION_SAMPLE))
        self._samples.append((encoding, whole.copy()))  # consecutive bytes: for the correlation

    def _correlations(self) -> tuple[float, float]:
        """|lag-1 correlation| of the kept samples read as declared, and as the other law."""
        as_declared, as_other = _Moments(), _Moments()
        for encoding, codes in self._samples:
            as_declared.add(_VALUES[encoding][codes])
            as_other.add(_VALUES[_OTHER[encoding]][codes])
        return abs(as_declared.correlation), abs(as_other.correlation)

    def decide(self) -> LawMismatch | None:
        """After a batch: a verdict once there is enough audio (then `done`)."""
        if self.done or self.fed < MIN_BYTES:
            return None
        as_declared = self._quiet_declared / self.counted
        as_other = self._quiet_other / self.counted
        verdict = False
        if as_other >= MIN_QUIET_SHARE and as_declared * RATIO <= as_other:
            declared_r, other_r = self._correlations()  # only now: most audio never gets here
            quiet_only = (
                as_other >= QUIET_ONLY_SHARE
                and as_declared * QUIET_ONLY_RATIO <= as_other
                and declared_r < other_r + VETO
            )
            smoother = other_r >= MIN_CORRELATION and other_r >= declared_r + MORE_CORRELATED
            verdict = quiet_only or smoother
        if verdict:
            declared = max(self._declared, key=self._declared.__getitem__)
            self.mismatch = LawMismatch(declared, _OTHER[declared], as_declared, as_other)
        if verdict or self.fed >= CHECK_BYTES:
            self.done = True
            self._samples = []
        return self.mismatch
