"""Encryption at rest: what is uploaded is encrypted for `archive_recipients` in the age format
(through pyrage), so the standard `age` tool decrypts it with one of their identities.

pyrage holds the GIL while it encrypts: this runs in the archiver's own process only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyrage


def load_recipients(keys: Sequence[str]) -> list[Any]:
    """age (`age1...`) or SSH (`ssh-ed25519 ...`, `ssh-rsa ...`) public keys. Raises
    ValueError naming the one that is not a key."""
    recipients: list[Any] = []
    for key in keys:
        try:
            if key.startswith("ssh-"):
                recipients.append(pyrage.ssh.Recipient.from_str(key))
            else:
                recipients.append(pyrage.x25519.Recipient.from_str(key))
        except Exception:
            shown = key if len(key) <= 20 else key[:20] + "..."
            raise ValueError(f"{shown!r} is not an age public key (age1...)") from None
    return recipients


def encrypt_bytes(data: bytes, recipients: Sequence[Any]) -> bytes:
    return bytes(pyrage.encrypt(data, list(recipients)))


def encrypt_to(source: Path, target: Path, recipients: Sequence[Any]) -> None:
    """Encrypt `source` into `target`, complete or not at all (written beside it, fsynced and
    renamed): an encrypted copy that exists is whole, and a resumed upload can send it again."""
    tmp = target.with_name(f".{target.name}.tmp")
    pyrage.encrypt_file(str(source), str(tmp), list(recipients))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
