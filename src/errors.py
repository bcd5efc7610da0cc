"""The two kinds of error a user can meet, and the exit codes they map to.

`ConfigError` is a mistake in what the user asked for (exit 2, nothing written); `RunError` is a
failure while running (exit 1). Both carry a one-line message that names the culprit and the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TemplateError(Exception):
    """Base of the template's errors; the message is kept to one line whatever text it quotes."""

    exit_code = 1

    def __init__(self, message: str = "") -> None:
        super().__init__(one_line(str(message)))


class ConfigError(TemplateError):
    """Bad configuration, bad command line or bad component arguments: exit code 2."""

    exit_code = 2


class RunError(TemplateError):
    """A failure while running (data missing, NaN loss, corrupt checkpoint): exit code 1."""

    exit_code = 1


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped, so an error stays on one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The valid names nearest to a mistyped one, best first."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    same_letters = [lowered[word.lower()]] if word.lower() in lowered else []
    by_case = [lowered[m] for m in difflib.get_close_matches(word.lower(), lowered, n=n, cutoff=0.5)]
    exact = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    return list(dict.fromkeys(same_letters + by_case + exact))[:n]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' or '' when nothing is close."""
    found = closest(word, choices)
    if not found:
        return ""
    return " (did you mean " + " or ".join(repr(f) for f in found) + "?)"
