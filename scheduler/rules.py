"""Rules without code: the ``when`` and ``urgent`` conditions of a job.

A condition is JSON written in a job definition (README, "Rules without
code"): field names map to expected values or to operators (``equals``,
``in``, ``matches``, ``lt``, ``le``, ``gt``, ``ge``, ``present``), and
``any``/``all``/``not`` combine conditions; an object is all of its
entries. :func:`compile_condition` checks it once, when the services are
loaded, and raises :class:`RuleError` naming the place inside the condition
that is wrong; what it returns is evaluated here, purely, against one series
of the headers document (:func:`series_records`) at planning time. Every
verdict carries the reason it holds or not, in words for the session trace.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import re2

from scheduler.dicom import ALL_TAGS

# A field that is no DICOM tag: the number of instances of the series.
INSTANCES = "instances"
FIELDS = frozenset((*ALL_TAGS, INSTANCES))
COMBINATORS = ("any", "all", "not")
OPERATORS = ("equals", "in", "matches", "lt", "le", "gt", "ge", "present")
_COMPARISONS: dict[str, tuple[str, Callable[[float, float], bool]]] = {
    "lt": ("<", lambda a, b: a < b),
    "le": ("<=", lambda a, b: a <= b),
    "gt": (">", lambda a, b: a > b),
    "ge": (">=", lambda a, b: a >= b),
}


KeyPath = tuple[str | int, ...]


def render(path: KeyPath) -> str:
    """``("when", "any", 1, "SliceThickness")`` as ``when.any[1].SliceThickness``."""
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return text


class RuleError(ValueError):
    """A condition that cannot be used; ``path`` says where inside it
    (the keys and indexes from the job's field down to the wrong value)."""

    def __init__(self, path: KeyPath, message: str) -> None:
        super().__init__(f"{render(path)}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True)
class Verdict:
    """Whether a condition holds for one series, and why (or why not)."""

    holds: bool
    reason: str


# A series as a condition sees it: field → its values (several for a
# multi-valued tag, or for an instance tag that differs between instances).
Record = Mapping[str, list[Any]]


class Condition:
    """A compiled condition; :meth:`test` evaluates it against one series."""

    def test(self, record: Record) -> Verdict:  # pragma: no cover - abstract
        raise NotImplementedError


def show(value: Any) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _shown_values(values: list[Any]) -> str:
    return show(values[0]) if len(values) == 1 else show(values)


def _number(value: Any) -> float | None:
    """A tag value as a number: DICOM keeps DS and IS values as text."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _equal(actual: Any, expected: Any) -> bool:
    if isinstance(expected, int | float) and not isinstance(expected, bool):
        return _number(actual) == float(expected)
    if isinstance(actual, int | float) and not isinstance(actual, bool):
        # A number the store keeps as one (SliceThickness 5.0) equals "5";
        # text such as a PatientID "007" stays text.
        return actual == _number(expected)
    return str(actual).strip().casefold() == str(expected).casefold()


# --------------------------------------------------------------------------
# Tests on one field


@dataclass(frozen=True)
class _Equals(Condition):
    field: str
    expected: tuple[Any, ...]

    def test(self, record: Record) -> Verdict:
        values = record.get(self.field)
        if not values:
            return Verdict(False, f"{self.field} is absent")
        hit = next((v for v in values if any(_equal(v, e) for e in self.expected)), None)
        if hit is not None:
            return Verdict(True, f"{self.field} is {show(hit)}")
        wanted = (
            show(self.expected[0])
            if len(self.expected) == 1
            else f"one of {show(list(self.expected))}"
        )
        return Verdict(False, f"{self.field} is {_shown_values(values)}, not {wanted}")


@dataclass(frozen=True)
class _Matches(Condition):
    field: str
    source: str
    pattern: Any  # a compiled RE2 pattern

    def test(self, record: Record) -> Verdict:
        values = record.get(self.field)
        if not values:
            return Verdict(False, f"{self.field} is absent")
        for value in values:
            if self.pattern.search(str(value)):
                return Verdict(True, f"{self.field} {show(value)} matches {show(self.source)}")
        return Verdict(
            False,
            f"{self.field} is {_shown_values(values)}, which does not match {show(self.source)}",
        )


def _regex(source: str) -> Any:
    """``source`` compiled by RE2, case-insensitive: its matching time grows
    with the text, never exponentially, so a rule cannot hang planning (at
    the price of backreferences and lookaround, which RE2 does not have)."""
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False
    return re2.compile(source, options)


@dataclass(frozen=True)
class _Compare(Condition):
    field: str
    operator: str
    bound: float

    def test(self, record: Record) -> Verdict:
        values = record.get(self.field)
        symbol, holds = _COMPARISONS[self.operator]
        wanted = f"{symbol} {self.bound:g}"
        if not values:
            return Verdict(False, f"{self.field} is absent (wanted {wanted})")
        numbers = [n for n in map(_number, values) if n is not None]
        if not numbers:
            return Verdict(False, f"{self.field} is {_shown_values(values)}, not a number")
        for number in numbers:
            if holds(number, self.bound):
                return Verdict(True, f"{self.field} is {number:g} ({wanted})")
        return Verdict(False, f"{self.field} is {_shown_values(values)}, not {wanted}")


@dataclass(frozen=True)
class _Present(Condition):
    field: str
    wanted: bool

    def test(self, record: Record) -> Verdict:
        values = record.get(self.field)
        if values:
            return Verdict(self.wanted, f"{self.field} is present ({_shown_values(values)})")
        return Verdict(not self.wanted, f"{self.field} is absent")


# --------------------------------------------------------------------------
# Combinations


@dataclass(frozen=True)
class _All(Condition):
    parts: tuple[Condition, ...]

    def test(self, record: Record) -> Verdict:
        reasons = []
        for part in self.parts:
            verdict = part.test(record)
            if not verdict.holds:
                return verdict
            reasons.append(verdict.reason)
        return Verdict(True, " and ".join(reasons) or "no condition")


@dataclass(frozen=True)
class _Any(Condition):
    parts: tuple[Condition, ...]

    def test(self, record: Record) -> Verdict:
        reasons = []
        for part in self.parts:
            verdict = part.test(record)
            if verdict.holds:
                return verdict
            reasons.append(verdict.reason)
        return Verdict(False, "none of: " + "; ".join(reasons))


@dataclass(frozen=True)
class _Not(Condition):
    part: Condition

    def test(self, record: Record) -> Verdict:
        verdict = self.part.test(record)
        if verdict.holds:
            return Verdict(False, f"{verdict.reason} (excluded by 'not')")
        return Verdict(True, verdict.reason)


# --------------------------------------------------------------------------
# Compiling


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _scalar(value: Any, path: KeyPath) -> Any:
    if isinstance(value, str) or _is_number(value):
        return value
    raise RuleError(path, f"expected a string or a number, got {show(value)}")


def _field_tests(name: str, spec: Any, path: KeyPath) -> list[Condition]:
    if isinstance(spec, list):
        if not spec:
            raise RuleError(path, "expected at least one value in the list")
        return [_Equals(name, tuple(_scalar(v, (*path, i)) for i, v in enumerate(spec)))]
    if not isinstance(spec, dict):
        return [_Equals(name, (_scalar(spec, path),))]
    if not spec:
        raise RuleError(path, f"expected a value or operators ({', '.join(OPERATORS)}), got {{}}")
    tests: list[Condition] = []
    for operator, argument in spec.items():
        where = (*path, operator)
        if operator not in OPERATORS:
            raise RuleError(
                where,
                f"unknown operator {operator!r}{_suggestion(operator, OPERATORS)}; "
                f"use one of {', '.join(OPERATORS)}",
            )
        tests.append(_operator(name, operator, argument, where))
    return tests


def _operator(name: str, operator: str, argument: Any, path: KeyPath) -> Condition:
    if operator == "equals":
        return _Equals(name, (_scalar(argument, path),))
    if operator == "in":
        if not isinstance(argument, list) or not argument:
            raise RuleError(path, f"expected a non-empty list of values, got {show(argument)}")
        return _Equals(name, tuple(_scalar(v, (*path, i)) for i, v in enumerate(argument)))
    if operator == "matches":
        if not isinstance(argument, str):
            raise RuleError(path, f"expected a regular expression (a string), got {show(argument)}")
        try:
            return _Matches(name, argument, _regex(argument))
        except re2.error as exc:
            reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
            raise RuleError(
                path,
                f"invalid regular expression {show(argument)}: {reason} (rules use RE2 "
                "syntax: no backreferences or lookaround)",
            ) from None
    if operator == "present":
        if not isinstance(argument, bool):
            raise RuleError(path, f"expected true or false, got {show(argument)}")
        return _Present(name, argument)
    if not _is_number(argument):
        raise RuleError(path, f"expected a number, got {show(argument)}")
    return _Compare(name, operator, float(argument))


def _suggestion(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _compile(spec: Any, path: KeyPath) -> Condition:
    if not isinstance(spec, dict):
        raise RuleError(path, f"expected an object of conditions, got {show(spec)}")
    if not spec:
        raise RuleError(path, "expected at least one condition, got {}")
    parts: list[Condition] = []
    for key, value in spec.items():
        where = (*path, key)
        if key == "not":
            parts.append(_Not(_compile(value, where)))
        elif key in ("any", "all"):
            if not isinstance(value, list) or not value:
                raise RuleError(
                    where, f"expected a non-empty list of conditions, got {show(value)}"
                )
            members = tuple(_compile(item, (*where, i)) for i, item in enumerate(value))
            parts.append(_Any(members) if key == "any" else _All(members))
        elif key in FIELDS:
            parts.extend(_field_tests(key, value, where))
        else:
            raise RuleError(
                where,
                f"unknown field {key!r}{_suggestion(key, sorted(FIELDS))}; a condition names "
                'recorded header fields (README, "The headers document"), '
                f"{INSTANCES!r}, 'any', 'all' or 'not'",
            )
    return parts[0] if len(parts) == 1 else _All(tuple(parts))


def compile_condition(spec: Any, path: KeyPath = ("when",)) -> Condition:
    """Check a condition as written and compile it; :class:`RuleError` if unusable."""
    return _compile(spec, path)


# --------------------------------------------------------------------------
# Evaluating against the headers document


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list):
        return [item for item in value if item is not None]
    return [value]


def series_records(headers: Mapping[str, Any]) -> list[tuple[str, dict[str, list[Any]]]]:
    """(SeriesInstanceUID, record) of every series of a headers document.

    A record holds the series' own tags, then its study's and patient's, then
    the tags of its instances (all their distinct values) and ``instances``,
    its instance count.
    """
    studies = {s.get("StudyInstanceUID"): s for s in headers.get("studies", [])}
    patient = headers.get("patient", {})
    records = []
    for series in headers.get("series", []):
        record: dict[str, list[Any]] = {}
        study = studies.get(series.get("StudyInstanceUID"), {})
        for source in (series, study, patient):
            for key, value in source.items():
                if key not in record and key not in ("instances", "series", "instance_count"):
                    record[key] = _values(value)
        for instance in series.get("instances", []):
            for key, value in instance.items():
                if key == "location":
                    continue
                seen = record.setdefault(key, [])
                seen.extend(v for v in _values(value) if v not in seen)
        record[INSTANCES] = [series.get("instance_count", len(series.get("instances", [])))]
        records.append((str(series.get("SeriesInstanceUID", "")), record))
    return records


@dataclass(frozen=True)
class SeriesOutcome:
    """Which series of a candidate satisfy a condition, and the reasons."""

    matched: list[str]
    reasons: dict[str, str]  # SeriesInstanceUID → why it holds or not

    @property
    def holds(self) -> bool:
        return bool(self.matched)

    def summary(self) -> str:
        """One line: why the first matching series matched, or why none did."""
        total = len(self.reasons)
        if self.matched:
            first = self.reasons[self.matched[0]]
            return f"{first} ({len(self.matched)} of {total} series matched)"
        if not total:
            return "the candidate has no series (no series matched)"
        groups: dict[str, list[str]] = {}
        for uid, reason in self.reasons.items():
            groups.setdefault(reason, []).append(uid)
        if len(groups) == 1:
            return f"{next(iter(groups))} (no series matched)"
        parts = [
            f"{reason} (series {', '.join(uids[:2])}{', …' if len(uids) > 2 else ''})"
            for reason, uids in groups.items()
        ]
        return "; ".join(parts) + f" (none of {total} series matched)"


def evaluate(
    condition: Condition,
    records: Sequence[tuple[str, Mapping[str, list[Any]]]],
    only: Sequence[str] | None = None,
) -> SeriesOutcome:
    """Test ``condition`` on each series (those in ``only`` when given)."""
    wanted = None if only is None else set(only)
    matched, reasons = [], {}
    for uid, record in records:
        if wanted is not None and uid not in wanted:
            continue
        verdict = condition.test(record)
        reasons[uid] = verdict.reason
        if verdict.holds:
            matched.append(uid)
    return SeriesOutcome(matched, reasons)
