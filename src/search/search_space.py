"""The search-space syntax that script/sweep.py --optuna and script/ray_tune.py share.

    optimizer.lr=1e-4,1e-3          a choice among the listed values (a grid axis for a plain sweep)
    optimizer.lr=loguniform:1e-5:1e-1   a float drawn on a log scale between the bounds
    model.dropout=uniform:0:0.5     a float drawn uniformly between the bounds
    batch=int:16:128                an integer, both bounds included
    epoch=20                        a fixed setting, applied to every trial

Each engine turns a `Dimension` into its own distribution (Optuna's, Ray Tune's); the values a trial
gets go to train.py as ordinary `key=value` overrides, so a trial is an ordinary result directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from src.errors import ConfigError

RANGES = ("uniform", "loguniform", "int")


@dataclass(frozen=True)
class Dimension:
    """One searched setting: `kind` is "choice" (with `choices`) or one of RANGES (with `low`, `high`)."""

    key: str
    kind: str
    choices: tuple[str, ...] = ()
    low: float = 0.0
    high: float = 0.0

    def spec(self) -> str:
        """The text the user wrote, normalised: what identifies the space of a study."""
        if self.kind == "choice":
            return f"{self.key}={','.join(self.choices)}"
        return f"{self.key}={self.kind}:{_text(self.low)}:{_text(self.high)}"

    def bounds(self) -> list[str]:
        """Values worth checking before any trial runs: every choice, or both ends of a range."""
        if self.kind == "choice":
            return list(self.choices)
        return [override_value(self.low if self.kind != "int" else int(self.low)),
                override_value(self.high if self.kind != "int" else int(self.high))]  # fmt: skip


def _text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def override_value(value: Any) -> str:
    """A sampled value as train.py's `key=value` text: floats round-trip exactly (repr)."""
    if hasattr(value, "item"):  # a NumPy scalar, as Ray Tune samples them
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return repr(value) if isinstance(value, float) else str(int(value))


def parse_range(item: str) -> Dimension | None:
    """`key=loguniform:1e-5:1e-1` -> a Dimension; None when the value is not a range."""
    key, _, text = item.partition("=")
    kind, sep, rest = text.partition(":")
    if not sep or kind.strip() not in RANGES:
        return None
    kind, key = kind.strip(), key.strip()
    parts = rest.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        low, high = (int(p) if kind == "int" else float(p) for p in parts)
    except ValueError:
        raise ConfigError(
            f"'{item}': a range is {kind}:LOW:HIGH with two {'integers' if kind == 'int' else 'numbers'}, "
            f"e.g. {key}={kind}:{'16:128' if kind == 'int' else '1e-5:1e-1'}"
        ) from None
    if not low < high or not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"'{item}': the low bound must be below the high bound")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"'{item}': loguniform needs a low bound above 0")
    return Dimension(key, kind, low=low, high=high)


def parse(items: list[str]) -> tuple[list[str], list[Dimension]]:
    """(fixed overrides, searched dimensions): a range or several values is searched, one value is fixed."""
    ranges = [d for d in (parse_range(i) for i in items) if d is not None]
    rest = [i for i in items if parse_range(i) is None]
    fixed, axes = parse_axes(rest)
    dims = [Dimension(k, "choice", choices=tuple(v)) for k, v in axes] + ranges
    seen: set[str] = set()
    for d in dims:
        if d.key in seen:
            raise ConfigError(f"'{d.key}' is searched twice; give its values or range once")
        seen.add(d.key)
    for item in fixed:
        if item.partition("=")[0].strip() in seen:
            raise ConfigError(f"'{item}' fixes a setting that is also searched; give it once")
    return fixed, dims


def split_values(text: str) -> list[str]:
    """`1e-4,1e-3` -> ['1e-4', '1e-3']; commas inside [...], {...} or quotes do not split."""
    parts, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    parts.append(current)
    return [p.strip() for p in parts]


def parse_axes(items: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(fixed overrides, [(key, [value texts])]): an item with several values is an axis of the grid."""
    fixed, axes = [], []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"malformed setting '{item}': write key=value or key=v1,v2,...")
        values = split_values(text)
        if len(values) > 1:
            if any(not v for v in values):
                raise ConfigError(f"'{item}' has an empty value; write key=v1,v2,...")
            if key.strip() in (k for k, _ in axes):
                raise ConfigError(
                    f"'{key.strip()}' is swept twice; give its values once, separated by commas"
                )
            axes.append((key.strip(), values))
        else:
            fixed.append(item)
    return fixed, axes
