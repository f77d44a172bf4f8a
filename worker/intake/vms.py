"""The VMs of a job: the disks of each VM of its OVA and OVF sources, counted by phase."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from worker.core.model import Phase


@dataclass(frozen=True)
class VmCounts:
    """One VM of a job's OVA or OVF sources: its disks, counted by phase."""

    vm_name: str
    counts: Mapping[str, int] = field(default_factory=dict)

    @property
    def disk_count(self) -> int:
        return sum(self.counts.values())

    @property
    def state(self) -> str:
        """done when all its disks are; failed when all ended and one failed; pending when
        none started; running otherwise."""
        done = self.counts.get(Phase.DONE, 0)
        failed = self.counts.get(Phase.FAILED, 0)
        if done == self.disk_count:
            return "done"
        if done + failed == self.disk_count:
            return "failed"
        if self.counts.get(Phase.PENDING, 0) == self.disk_count:
            return "pending"
        return "running"

    def record(self) -> dict[str, object]:
        """The VM as `status -f json` shows it."""
        counts = {phase.value: self.counts.get(phase.value, 0) for phase in Phase}
        return {
            "vm_name": self.vm_name,
            "state": self.state,
            "disk_count": self.disk_count,
            **counts,
        }


def vm_name_of(spec: Mapping[str, object]) -> str | None:
    """The VM a results row's disk belongs to (its spec's appliance), or None."""
    appliance = spec.get("appliance")
    name = appliance.get("vm_name") if isinstance(appliance, Mapping) else None
    return name if isinstance(name, str) else None


def group_vms(rows: Iterable[tuple[Mapping[str, object], str]]) -> list[VmCounts]:
    """(spec, phase) of a job's rows in manifest order -> its VMs in the order they come.

    A VM is told apart by its manifest entry too: two exports of one VM are two VMs.
    """
    groups: dict[tuple[object, str], dict[str, int]] = {}
    for spec, phase in rows:
        name = vm_name_of(spec)
        if name is None:
            continue
        appliance = spec.get("appliance")
        entry = appliance.get("entry") if isinstance(appliance, Mapping) else None
        counts = groups.setdefault((entry, name), {})
        counts[phase] = counts.get(phase, 0) + 1
    return [VmCounts(name, counts) for (_, name), counts in groups.items()]
