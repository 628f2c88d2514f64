"""Placeholder until the guard branch lands (PauseFile only)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import Engine

__all__ = ["ActiveSessions", "PauseFile", "ReplicaLag"]


class PauseFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def reason(self) -> str | None:
        return f"pause file {self.path} exists" if self.path.exists() else None

    def close(self) -> None:
        pass


class ReplicaLag:
    def __init__(self, primary: Engine, max_seconds: float,
                 replica_urls: Sequence[str] = ()) -> None:
        raise NotImplementedError

    def check(self) -> None:
        raise NotImplementedError

    def reason(self) -> str | None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ActiveSessions:
    def __init__(self, engine: Engine, max_sessions: int) -> None:
        raise NotImplementedError

    def reason(self) -> str | None:
        raise NotImplementedError

    def close(self) -> None:
        pass
