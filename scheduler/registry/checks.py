"""Checks across services: names, entries, job names, dependencies, cycles.

A service with a problem is left out on its own; the checks run in an order
that keeps a broken service from knocking out a working one: names and the
dependency graph first, then the entries, whose code is only run for a
service that is still healthy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.entries import (
    EntryError,
    inside,
    locate,
    same_path,
)
from scheduler.registry.definitions import Draft, JobDefinition
from scheduler.registry.importcheck import ImportChecker
from scheduler.vocabulary import Phase


def check_service_names(drafts: list[Draft]) -> None:
    first: dict[str, Draft] = {}
    for draft in drafts:
        other = first.setdefault(draft.name, draft)
        if other is not draft:
            draft.report(None, None, f"duplicate service name {draft.name!r} (also {other.label})")


def _top_level_modules(folder: Path) -> dict[str, Path]:
    """Modules a service folder provides at the top level (entries or not)."""
    modules = {}
    for child in sorted(folder.iterdir()):
        if child.suffix == ".py" and child.is_file():
            modules[child.stem] = child
        elif (child / "__init__.py").is_file():
            modules[child.name] = child
    return modules


@dataclass
class ModuleClaims:
    """Which service provides each top-level module, so two services never
    silently share one entry in sys.modules."""

    owners: dict[str, tuple[Draft, Path]] = field(default_factory=dict)

    def conflict(self, draft: Draft, top: str, location: Path) -> bool:
        owner = self.owners.get(top)
        if owner is None or owner[0] is draft or same_path(owner[1], location):
            return False
        draft.report(
            None,
            None,
            f"module {top!r} of service {draft.name!r} is also provided by service"
            f" {owner[0].name!r} ({owner[1]}); rename one of them",
        )
        return True

    def claim(self, draft: Draft, top: str, location: Path) -> None:
        self.owners.setdefault(top, (draft, location))


def _entries(draft: Draft, job: JobDefinition) -> Iterator[tuple[str, str, str]]:
    """(canonical field, field as written, entry) of a job."""
    written = draft.written.get(job.job_name, {})
    for canonical, entry in (
        ("workerEntry", job.worker_entry),
        ("registryEntry", job.registry_entry),
    ):
        if entry:
            yield canonical, written.get(canonical, canonical), entry


def check_entries(draft: Draft, claims: ModuleClaims, checker: ImportChecker | None) -> None:
    """Entries inside the service, not shared with another service, importable
    (imported by ``checker``, in a process of its own; None: not imported).

    A service already left out for another problem is only checked for where
    its entries point: its code is not run, and its modules claim nothing,
    so it cannot knock out a working service that uses the same names.
    """
    healthy = not draft.problems
    own_root = draft.own_root
    own = _top_level_modules(own_root) if own_root and healthy else {}
    clashes = [top for top, location in own.items() if claims.conflict(draft, top, location)]
    to_import: list[tuple[str, str, str, str]] = []
    for job in draft.service.jobs:
        for canonical, written, entry in _entries(draft, job):
            try:
                target = locate(entry, draft.roots, draft.package)
            except EntryError as exc:
                draft.report(job.job_name, written, f"cannot import {canonical} {entry!r}: {exc}")
                continue
            if draft.code_from_entries:
                draft.code.append(target.location)
            if not healthy:
                continue
            if target.top in clashes or claims.conflict(draft, target.top, target.location):
                clashes.append(target.top)
                continue
            claims.claim(draft, target.top, target.location)
            if canonical == "workerEntry" and job.python:
                # It runs under its own interpreter, with dependencies this
                # process may lack: check where it is, never import it here.
                continue
            to_import.append((job.job_name, canonical, written, entry))
    if checker is None or clashes or not healthy:
        return  # never run code that would share another service's modules
    errors, modules = checker.check(
        [(entry, draft.roots, draft.package) for *_, entry in to_import]
    )
    for (job_name, canonical, written, entry), error in zip(to_import, errors, strict=True):
        if error is not None:
            draft.report(job_name, written, f"cannot import {canonical} {entry!r}: {error}")
    for top in own:
        # Modules the entries imported in turn (a `utils` of the service) are
        # claimed too, so another service with its own `utils` is reported.
        location = modules.get(top)
        if own_root and location is not None and inside(location, [own_root]):
            claims.claim(draft, top, location)


def check_job_names(drafts: list[Draft]) -> dict[str, Draft]:
    """Report repeated jobNames; returns name -> owner. Of two services with
    one name the one found first keeps it, unless it already has a problem
    and the other has none: a broken service never knocks out a working one."""
    owners: dict[str, Draft] = {}
    for draft in [d for d in drafts if not d.problems] + [d for d in drafts if d.problems]:
        seen: set[str] = set()
        for name in draft.job_names:
            owner = owners.setdefault(name, draft)
            if name in seen:
                draft.report(name, "jobName", f"duplicate jobName {name!r} (twice in this file)")
            elif owner is not draft:
                draft.report(
                    name,
                    "jobName",
                    f"duplicate jobName {name!r} (also in service {owner.name!r}, {owner.label})",
                )
            seen.add(name)
    return owners


def _valid_jobs(drafts: list[Draft], owners: dict[str, Draft]) -> dict[str, JobDefinition]:
    return {
        job.job_name: job
        for draft in drafts
        for job in draft.service.jobs
        if owners.get(job.job_name) is draft
    }


def check_dependencies(drafts: list[Draft], owners: dict[str, Draft]) -> None:
    """Every dependsOn names a known job of the same or an earlier phase."""
    jobs = _valid_jobs(drafts, owners)
    order: dict[str, int] = {phase: phase.order for phase in Phase}
    for draft in drafts:
        for job in draft.service.jobs:
            for name in job.depends_on:
                target = jobs.get(name)
                if name not in owners:
                    draft.report(job.job_name, "dependsOn", f"unresolved dependsOn {name!r}")
                elif target is not None and order[target.phase] > order[job.phase]:
                    # Main jobs wait for every pre job and post jobs for every
                    # pre and main job: depending on a later phase deadlocks.
                    draft.report(
                        job.job_name,
                        "dependsOn",
                        f"dependsOn {name!r} is a {target.phase} job, and {target.phase} jobs"
                        f" wait for every {job.phase} job (a dependency cycle through phases)",
                    )


def _reachable(graph: dict[str, list[str]], start: str) -> set[str]:
    seen: set[str] = set()
    stack = list(graph[start])
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(graph[node])
    return seen


def _cycle_through(start: str, graph: dict[str, list[str]], members: set[str]) -> list[str]:
    """The shortest cycle from ``start`` back to itself inside one component."""
    parents: dict[str, str] = {}
    queue = [start]
    for node in queue:
        for successor in sorted(graph[node]):
            if successor == start:
                path = [node]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                return [*reversed(path), start]
            if successor in members and successor not in parents:
                parents[successor] = node
                queue.append(successor)
    raise AssertionError(f"{start!r} is on no cycle")


def check_cycles(drafts: list[Draft], owners: dict[str, Draft]) -> None:
    """Report each dependency cycle to every service with a job on it."""
    jobs = _valid_jobs(drafts, owners)
    graph = {name: [d for d in job.depends_on if d in jobs] for name, job in sorted(jobs.items())}
    reach = {name: _reachable(graph, name) for name in graph}
    reported: set[str] = set()
    for name in graph:
        if name in reported or name not in reach[name]:
            continue
        members = {other for other in reach[name] if name in reach[other]}
        reported |= members
        for draft in dict.fromkeys(owners[member] for member in sorted(members)):
            start = min(member for member in members if owners[member] is draft)
            cycle = " -> ".join(_cycle_through(start, graph, members))
            draft.report(start, "dependsOn", f"dependency cycle: {cycle}")


def cascade(drafts: list[Draft], owners: dict[str, Draft]) -> None:
    """A service needing a job of a broken service is broken too, until stable."""
    changed = True
    while changed:
        changed = False
        for draft in drafts:
            if draft.problems:
                continue
            for job in draft.service.jobs:
                for name in job.depends_on:
                    owner = owners.get(name)
                    if owner is not None and owner is not draft and owner.problems:
                        message = f"dependsOn {name!r} is a job of broken service {owner.name!r}"
                        draft.report(job.job_name, "dependsOn", message)
                        changed = True
