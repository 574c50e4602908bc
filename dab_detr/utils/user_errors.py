"""Errors in what a user gave (a config file or key, a dataset, a weights file), and how the
command-line tools report them: one line that says what to do, not a traceback.

The exception types subclass the built-in ones code already catches (``KeyError``,
``FileNotFoundError``, ``ValueError``), so a caller that handles those keeps working;
:class:`UserInputError` marks them for :func:`report_user_errors`. ``--debug`` (where a tool
has it) or ``DAB_DETR_DEBUG=1`` lets the traceback through.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
from collections.abc import Iterable, Iterator

__all__ = [
    "DEBUG_ENV",
    "InputFileNotFoundError",
    "InputValueError",
    "UnknownKeyError",
    "UserInputError",
    "closest",
    "debug_requested",
    "report_user_errors",
]

DEBUG_ENV = "DAB_DETR_DEBUG"


class UserInputError(Exception):
    """Bad input from the user: the command-line tools print the message alone."""


class UnknownKeyError(UserInputError, KeyError):
    """A name (config key, dataset) that does not exist."""

    def __str__(self) -> str:  # KeyError's own __str__ quotes the message
        return str(self.args[0]) if self.args else ""


class InputFileNotFoundError(UserInputError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class InputValueError(UserInputError, ValueError):
    """A value the user gave cannot be used (a file that is not what it should be, ...)."""


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``candidates`` near ``name``, best first: compared as whole dotted names
    and by their last parts (a key put under the wrong parent), keeping only those about as
    near as the nearest, so that one clear match is offered alone."""

    def ratio(a: str, b: str) -> float:
        return difflib.SequenceMatcher(None, a, b).ratio()

    leaf = name.rsplit(".", 1)[-1]
    scored = []
    for c in candidates:
        score = max(ratio(name, c), ratio(leaf, c.rsplit(".", 1)[-1]) - 0.02)
        if score >= 0.75:
            scored.append((score, c))
    scored.sort(key=lambda sc: (-sc[0], sc[1]))
    if not scored:
        return []
    best = scored[0][0]
    return [c for score, c in scored if score >= best - 0.06][:n]


def debug_requested(argv: Iterable[str] | None = None) -> bool:
    """``--debug`` among ``argv`` (default ``sys.argv``) or ``DAB_DETR_DEBUG`` set to a
    non-empty value other than 0."""
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")


@contextlib.contextmanager
def report_user_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Turn a :class:`UserInputError` raised inside into ``prog: error: message`` on stderr
    and exit status 2 (argparse's, for bad arguments); with ``debug`` it propagates."""
    try:
        yield
    except UserInputError as e:
        if debug or debug_requested(()):
            raise
        print(f"{prog}: error: {e}  (--debug or {DEBUG_ENV}=1 shows the traceback)",
              file=sys.stderr)
        sys.exit(2)
