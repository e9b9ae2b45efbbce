"""The one label check: which values a case's label map may hold, and a refusal that names the file and the setting
that accepts the values. ``bsf data check``, training (the pre-training check and the label transform) and
``bsf evaluate`` all decide through :func:`label_rule` and :func:`label_problems`, one case at a time.

BraTS 2021 marks the enhancing tumour 4 and BraTS 2023+ marks it 3; ATLAS masks are 0/1. What a case may hold,
first match wins: ``finetune.label_format`` when not ``auto``; a label list given for the command or written in the
datalist (``"labels"``); the case's naming (``BraTS2021_*``: 2021, ``BraTS-*``: 2023+); else, for BraTS, either
convention but never both 3 and 4 in one map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from bsf.errors import DataError

BRATS21_LABELS = [0, 1, 2, 4]
BRATS23_LABELS = [0, 1, 2, 3]
ATLAS_LABELS = [0, 1]
LABEL_FORMATS = ("auto", "brats2021", "brats2023")
#: the setting that says which BraTS convention a data set uses, as named in errors
FORMAT_SETTING = "finetune.label_format"


@dataclass(frozen=True)
class LabelRule:
    """The values one case's label map may hold (``None``: any integer), and why (named in errors)."""

    allowed: frozenset[int] | None
    why: str
    brats: bool = False

    def et_label(self, values: Iterable[int]) -> int:
        """The enhancing-tumour label of a BraTS map holding ``values``: 3 when only 3 can be, else 4."""
        allowed = self.allowed if self.allowed is not None else frozenset({3, 4})
        if {3, 4} <= allowed:  # either convention: the map's own values decide
            return 3 if 3 in set(values) else 4
        return 3 if 3 in allowed else 4

    @property
    def tag(self) -> str:
        """A short key of the rule, for remembering which files already passed it."""
        return "any" if self.allowed is None else ",".join(str(v) for v in sorted(self.allowed))


def label_rule(dataset: str | None, case: str, *, label_format: str = "auto", listed: Sequence[int] | None = None) -> LabelRule:
    """The :class:`LabelRule` of ``case`` (its id or label file name) in ``dataset`` (see the module docstring).

    ``listed``: the label values a command was given or its datalist names.
    """
    if label_format not in LABEL_FORMATS:
        raise DataError(f"{FORMAT_SETTING}: {label_format!r} is not one of {', '.join(LABEL_FORMATS)}")
    brats = dataset == "brats" or case.startswith(("BraTS2021_", "BraTS-"))
    if dataset == "atlas" or (dataset is None and case.startswith("sub-")):
        return LabelRule(frozenset(ATLAS_LABELS), "an ATLAS lesion mask (0/1)")
    if brats and label_format != "auto":
        values = BRATS23_LABELS if label_format == "brats2023" else BRATS21_LABELS
        return LabelRule(frozenset(values), f"{FORMAT_SETTING}={label_format}", brats=True)
    if listed:
        return LabelRule(frozenset(int(v) for v in listed), "the listed labels", brats=brats)
    if case.startswith("BraTS2021_"):
        return LabelRule(frozenset(BRATS21_LABELS), "BraTS 2021 naming (BraTS2021_*)", brats=True)
    if case.startswith("BraTS-"):
        return LabelRule(frozenset(BRATS23_LABELS), "BraTS 2023+ naming (BraTS-*)", brats=True)
    if brats:
        return LabelRule(frozenset(BRATS21_LABELS) | frozenset(BRATS23_LABELS), "BraTS, either convention", brats=True)
    return LabelRule(None, "any integer")


def label_problems(values: Iterable[int], rule: LabelRule) -> list[str]:
    """What is wrong with a label map holding ``values`` under ``rule``, each with the setting that would accept
    it (empty: nothing)."""
    present = set(int(v) for v in values)
    problems = []
    if rule.allowed is not None and not present <= rule.allowed:
        bad = sorted(present - rule.allowed)
        problems.append(f"label values {bad} not allowed for {rule.why} (expected a subset of {sorted(rule.allowed)})" + _fix(bad, rule))
    if rule.brats and {3, 4} <= present:
        problems.append("label holds both 3 and 4 (BraTS 2021 marks enhancing tumour 4, BraTS 2023+ marks it 3; one map uses one)")
    return problems


def _fix(bad: list[int], rule: LabelRule) -> str:
    if not rule.brats or not set(bad) <= {3, 4}:
        return ""
    other = "brats2023" if 3 in bad else "brats2021"
    return f"; if this data set marks enhancing tumour {bad[0]}, set {FORMAT_SETTING}={other} (bsf data check: --labels {_listed(other)})"


def _listed(label_format: str) -> str:
    return ",".join(str(v) for v in (BRATS23_LABELS if label_format == "brats2023" else BRATS21_LABELS))


def check_label_values(values: Iterable[int], rule: LabelRule, path: object) -> None:
    """:class:`DataError` naming the label file ``path`` when its ``values`` break ``rule``."""
    problems = label_problems(values, rule)
    if problems:
        raise DataError(f"label file {path}: " + "; ".join(problems))
