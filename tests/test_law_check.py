"""The G.711 law check (receiver/codecs/law_check.py) on its own: A-law declared as µ-law (and
the reverse) is found in call-like audio and in silence; audio of the declared law, tones and
random bytes are never reported."""

from __future__ import annotations

import numpy as np

from receiver.codecs import g711
from receiver.codecs.encoding import Encoding
from receiver.codecs.law_check import LawCheck, LawMismatch
from tests.helpers import talk

LAWS = (Encoding.PCMU, Encoding.PCMA)


def check(declared: Encoding, data: bytes, batch: int = 8000) -> LawMismatch | None:
    """Fed as the writer feeds it: a batch at a time, a verdict asked after each."""
    law_check = LawCheck()
    for i in range(0, len(data), batch):
        law_check.feed(declared, data[i : i + batch])
        law_check.decide()
        if law_check.done:
            break
    return law_check.mismatch


def test_the_other_law_is_found_in_calls_and_silence() -> None:
    quiet_line = (6 * np.random.default_rng(1).standard_normal(16000)).astype(np.int16)
    for samples in (talk(2.0, 5), talk(3.0, 6), np.zeros(8000, np.int16), quiet_line):
        for sent in LAWS:
            data = g711.encode(sent.value, samples)
            assert check(sent, data) is None
            other = Encoding.PCMA if sent is Encoding.PCMU else Encoding.PCMU
            mismatch = check(other, data)
            assert mismatch is not None and (mismatch.declared, mismatch.likely) == (other, sent)


def test_tones_noise_and_random_bytes_are_never_reported() -> None:
    rng = np.random.default_rng(2)
    t = np.arange(16000) / 8000
    for amplitude in (100, 300, 600, 900, 1500, 2500, 5000, 12000, 30000):
        for frequency in (200, 440, 1000, 2000, 3000, 3400):
            tone = (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.int16)
            for law in LAWS:
                assert check(law, g711.encode(law.value, tone)) is None, (amplitude, frequency)
        hiss = np.clip(amplitude * rng.standard_normal(len(t)), -32768, 32767).astype(np.int16)
        for law in LAWS:
            assert check(law, g711.encode(law.value, hiss)) is None, amplitude
    for seed in range(10):
        data = np.random.default_rng(seed).integers(0, 256, 40000, dtype=np.uint8).tobytes()
        for law in LAWS:
            assert check(law, data) is None


def test_a_verdict_needs_a_second_and_is_given_up_after_ten() -> None:
    law_check = LawCheck()
    law_check.feed(Encoding.PCMU, b"\xd5" * 7999)  # A-law silence, a byte short of a second
    assert law_check.decide() is None and not law_check.done
    law_check.feed(Encoding.PCMU, b"\xd5")
    assert law_check.decide() is not None and law_check.done
    undecided = LawCheck()
    random_bytes = np.random.default_rng(3).integers(0, 256, 80_000, dtype=np.uint8).tobytes()
    undecided.feed(Encoding.PCMU, random_bytes)
    assert undecided.decide() is None and undecided.done  # ten seconds said nothing: stop
    undecided.feed(Encoding.PCMU, b"\xd5" * 80_000)
    assert undecided.decide() is None  # no longer looked at


def test_l16_ends_the_check_at_once() -> None:
    law_check = LawCheck()
    law_check.feed(Encoding.L16, b"\0\0" * 8000)
    assert law_check.done and law_check.decide() is None
