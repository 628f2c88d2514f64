"""What the supervisor tells a worker process of a ranged run (`WorkerSpec`, on its
stdin), and the heartbeat period both sides count with."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .config import Settings, Target, fernet_keys_from_env
from .steer import MAX_HEARTBEAT

__all__ = [
    "MAX_HEARTBEAT", "WorkerSpec", "heartbeat_every", "settings_from_dict", "settings_to_dict",
]



def heartbeat_every(lease_seconds: float) -> float:
    return min(MAX_HEARTBEAT, lease_seconds / 4)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs but its Fernet keys, which it reads from its own
    environment like any kms-migrate command. Sent on the worker's stdin (not argv, which
    `ps` shows: the database URL may hold a password)."""

    kind: str  # migrate | rollback
    run_id: int
    lock_token: str
    lease_seconds: float
    settings: dict[str, Any]
    log: dict[str, Any] = field(default_factory=dict)
    workers: int = 1  # started by the same command, this one included
    others: int = 0  # live workers of the run elsewhere when the command started its own

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))


def settings_to_dict(settings: Settings) -> dict[str, Any]:
    d = asdict(replace(settings, fernet_keys=()))
    d.pop("fernet_keys")
    d["targets"] = [t.as_dict() for t in settings.targets]
    return d


def settings_from_dict(d: dict[str, Any]) -> Settings:
    targets = tuple(Target(t["table"], t["primary_key"], tuple(t["columns"]))
                    for t in d["targets"])
    return Settings(**{**d, "targets": targets, "replicas": tuple(d.get("replicas") or ())},
                    fernet_keys=fernet_keys_from_env())
