"""SMTP AUTH password hashes: scrypt (RFC 7914) from the standard library.

Format: ``$scrypt$ln=14,r=8,p=1$<salt>$<key>`` (salt and key in unpadded base64), the
shape passlib and others use, so a hash made elsewhere with the same parameters verifies.
scrypt needs about 16 MiB and tens of milliseconds per check: callers run `verify` in a
worker thread, never on the event loop.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re

__all__ = ["hash_password", "is_hash", "verify_password"]

_FORMAT = re.compile(r"\$scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)")
_KEY_LEN = 32


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _derive(password: bytes, salt: bytes, ln: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password, salt=salt, n=2**ln, r=r, p=p, maxmem=2**ln * r * 256, dklen=_KEY_LEN
    )


def hash_password(password: str, *, ln: int = 14, r: int = 8, p: int = 1) -> str:
    """A new salted scrypt hash of `password` for the config file."""
    salt = os.urandom(16)
    key = _derive(password.encode("utf-8"), salt, ln, r, p)
    return f"$scrypt$ln={ln},r={r},p={p}${_b64(salt)}${_b64(key)}"


def is_hash(text: str) -> bool:
    """True when `text` is a hash this module can verify (used by config validation)."""
    m = _FORMAT.fullmatch(text)
    return m is not None and 1 <= int(m.group(1)) <= 20 and 1 <= int(m.group(2)) <= 32


def verify_password(password: bytes, hashed: str) -> bool:
    """Constant-time check of `password` against `hashed`; False for a malformed hash."""
    m = _FORMAT.fullmatch(hashed)
    if m is None:
        return False
    ln, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
    try:
        key = _derive(password, _unb64(m.group(4)), ln, r, p)
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(key, _unb64(m.group(5)))
