"""Which outbound endpoints a job may name (judge models): an allowlist in settings."""

from __future__ import annotations

from collections.abc import Sequence


def _normalise(url: str) -> str:
    return url.strip().rstrip("/")


def endpoint_allowed(endpoint: str, allowlist: Sequence[str]) -> bool:
    """`endpoint` is an allowlisted base URL or a path below one (never a longer host name)."""
    target = _normalise(endpoint)
    for entry in allowlist:
        base = _normalise(entry)
        if base and (target == base or target.startswith(base + "/")):
            return True
    return False
