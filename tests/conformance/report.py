"""What each target answered per contract case, how the targets differ, and the table."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SANDBOX = "sandbox"
REAL = "real-glance"

# Response headers whose presence (not value) is part of the contract.
HEADERS_OF_INTEREST = (
    "WWW-Authenticate",
    "X-Subject-Token",
    "Location",
    "OpenStack-image-import-methods",
    "OpenStack-image-store-ids",
    "X-Openstack-Request-Id",
)


@dataclass
class Observation:
    """One target's answer to one case, reduced to what must match between targets."""

    status: int
    body_kind: str  # "json", "text" or "empty"
    shape: dict[str, str]  # dotted JSON path -> JSON type name
    headers: frozenset[str]  # which HEADERS_OF_INTEREST were present
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class Comparison:
    """The outcome for one case: its differences, split into known (with reason) and new."""

    case: str
    known: list[tuple[str, str]] = field(default_factory=list)  # (difference, reason)
    new: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # targets that recorded nothing


OBSERVATIONS: dict[str, dict[str, Observation]] = {}
COMPARISONS: list[Comparison] = []
UNUSED_KNOWN: list[str] = []


def record(case: str, target: str, observation: Observation) -> None:
    OBSERVATIONS.setdefault(case, {})[target] = observation


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def shape_of(value: Any, depth: int, prefix: str = "") -> dict[str, str]:
    """Flatten JSON into {path: type}; lists are described by their first element."""
    out = {prefix or "$": json_type(value)}
    if depth <= 0:
        return out
    if isinstance(value, dict):
        for key, item in value.items():
            out.update(shape_of(item, depth - 1, f"{prefix}.{key}" if prefix else key))
    elif isinstance(value, list) and value:
        out.update(shape_of(value[0], depth - 1, f"{prefix}[]"))
    return out


def differences(sandbox: Observation, real: Observation) -> list[str]:
    """Every aspect in which the sandbox's answer differs from the real one, as stable keys."""
    found: list[str] = []
    if sandbox.status != real.status:
        found.append(f"status: sandbox {sandbox.status}, real {real.status}")
    if sandbox.body_kind != real.body_kind:
        found.append(f"body: sandbox {sandbox.body_kind}, real {real.body_kind}")
    for path in sorted(set(sandbox.shape) | set(real.shape)):
        ours, theirs = sandbox.shape.get(path, "absent"), real.shape.get(path, "absent")
        if ours != theirs:
            found.append(f"field {path}: sandbox {ours}, real {theirs}")
    for header in sorted(sandbox.headers ^ real.headers):
        where = "sandbox only" if header in sandbox.headers else "real only"
        found.append(f"header {header}: {where}")
    for key in sorted(set(sandbox.facts) | set(real.facts)):
        ours, theirs = sandbox.facts.get(key, "absent"), real.facts.get(key, "absent")
        if ours != theirs:
            found.append(f"fact {key}: sandbox {ours!r}, real {theirs!r}")
    return found


def known_reason(case: str, difference: str, known: Mapping[tuple[str, str], str]) -> str | None:
    """The reason a difference is accepted: keys match a case (or "*") and a difference prefix."""
    for (case_key, prefix), reason in known.items():
        if case_key in (case, "*") and difference.startswith(prefix):
            return reason
    return None


def compare_all(cases: list[str], known: Mapping[tuple[str, str], str]) -> list[Comparison]:
    """Compare the two targets case by case; the result is also kept for the printed table."""
    COMPARISONS.clear()
    UNUSED_KNOWN[:] = [f"{case} / {prefix}" for case, prefix in known]
    for case in cases:
        seen = OBSERVATIONS.get(case, {})
        comparison = Comparison(case, missing=[t for t in (SANDBOX, REAL) if t not in seen])
        if not comparison.missing:
            for difference in differences(seen[SANDBOX], seen[REAL]):
                reason = known_reason(case, difference, known)
                _mark_used(case, difference, known)
                if reason is None:
                    comparison.new.append(difference)
                else:
                    comparison.known.append((difference, reason))
        COMPARISONS.append(comparison)
    return COMPARISONS


def _mark_used(case: str, difference: str, known: Mapping[tuple[str, str], str]) -> None:
    for case_key, prefix in known:
        if case_key in (case, "*") and difference.startswith(prefix):
            with contextlib.suppress(ValueError):
                UNUSED_KNOWN.remove(f"{case_key} / {prefix}")


def dump(path: Path) -> None:
    """Write every observation as JSON, for reading a CI failure after the fact."""
    data = {
        case: {
            target: asdict(seen) | {"headers": sorted(seen.headers)} for target, seen in by.items()
        }
        for case, by in OBSERVATIONS.items()
    }
    path.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))


def summary_lines() -> list[str]:
    """The comparison table: one row per case, then every difference under it."""
    if not COMPARISONS:
        return []
    lines = [f"{'case':<40} {'sandbox':>8} {'real':>8}  verdict"]
    for comparison in COMPARISONS:
        seen = OBSERVATIONS.get(comparison.case, {})
        statuses = [str(seen[t].status) if t in seen else "-" for t in (SANDBOX, REAL)]
        if comparison.missing:
            verdict = f"NOT RUN on {', '.join(comparison.missing)}"
        elif comparison.new:
            verdict = f"DIFFERS ({len(comparison.new)} new)"
        else:
            verdict = f"same ({len(comparison.known)} known)" if comparison.known else "same"
        lines.append(f"{comparison.case:<40} {statuses[0]:>8} {statuses[1]:>8}  {verdict}")
        lines.extend(f"    NEW   {difference}" for difference in comparison.new)
        lines.extend(f"    known {d}  [{reason}]" for d, reason in comparison.known)
    if UNUSED_KNOWN:
        lines.append("known differences that did not occur (remove them once the sandbox agrees):")
        lines.extend(f"    {entry}" for entry in UNUSED_KNOWN)
    return lines
