"""The application helper's Fernet keys (`migration.runtime`): parsed once per distinct
set of keys by the one parser (`codec.multi_fernet`), cached, and forgotten in a forked
child (a lock held by another thread at fork time would never be released there)."""

from __future__ import annotations

import os
import threading

from cryptography.fernet import MultiFernet

from .codec import BadFernetKey, multi_fernet

__all__ = ["cached_multi_fernet", "clear"]

_fernet_lock = threading.Lock()
_fernets: dict[tuple[str, ...], MultiFernet] = {}
_FERNET_CACHE_MAX = 8


def cached_multi_fernet(named: tuple[tuple[str, str], ...]) -> MultiFernet:
    """A MultiFernet over the keys of `named`, parsed once and cached until they change."""
    keys = tuple(k for _, k in named)
    cached = _fernets.get(keys)
    if cached is not None:
        return cached
    if not keys:
        raise ValueError(
            "ENCRYPTION_KEY not set: export the application's Fernet key (older keys go in "
            "ENCRYPTION_KEY_LEGACY, comma-separated)"
        )
    bad: str | None = None
    try:
        multi = multi_fernet(named)
    except BadFernetKey as exc:  # it holds the key's name only
        bad = exc.name
    if bad is not None:  # raised here, outside the except, so nothing chains to it
        raise ValueError(
            f"{bad} is not a valid Fernet key: it must be 32 bytes in url-safe base64, 44 "
            "characters ending in '=' (fix or remove it)"
        )
    with _fernet_lock:
        if len(_fernets) >= _FERNET_CACHE_MAX:
            _fernets.clear()
        _fernets[keys] = multi
    return multi


def clear() -> None:
    """Forget every parsed key set (tests; after rotating keys in place)."""
    with _fernet_lock:
        _fernets.clear()


def _forget_after_fork() -> None:
    global _fernet_lock, _fernets
    _fernet_lock, _fernets = threading.Lock(), {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
