"""The .mf digest of a disk of an OVA or OVF, computed in the same pass as the upload hash."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from worker.core.model import DiskSpec
from worker.errors import SourceDigestMismatch


def with_expected_digest(spec: DiskSpec, algorithms: Sequence[str]) -> tuple[str, ...]:
    """The algorithms to hash the source in: those asked for, and the .mf's, once each."""
    names = list(algorithms)
    expected = spec.expected_digest
    if expected is not None and expected["algorithm"] not in names:
        names.append(expected["algorithm"])
    return tuple(names)


def check_expected_digest(spec: DiskSpec, digests: Mapping[str, str]) -> None:
    """SourceDigestMismatch when the bytes read differ from the .mf's digest of them."""
    expected = spec.expected_digest
    if expected is None:
        return
    algorithm = expected["algorithm"]
    found = digests.get(algorithm)
    if found is not None and found != expected["value"]:
        where = ""
        if spec.appliance is not None:
            where = f" for {spec.appliance.get('file')}"
        raise SourceDigestMismatch(
            f"the source's {algorithm} is {found}, the manifest {expected['manifest']} gives "
            f"{expected['value']}{where}: the export was changed or damaged since it was made"
        )
