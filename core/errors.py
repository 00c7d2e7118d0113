"""The errors plugtune shows to users: each names what is at fault and how to fix it.

A recipe's problems are :class:`Problem` s (the key at fault, what is wrong, and where, when
it is a place in a file); :class:`RecipeError` renders them one line each."""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace


class PlugtuneError(Exception):
    """A problem with the user's input or environment; the CLI prints it without a traceback."""

    exit_code = 1


#: A problem line's head that is a recipe key (``train.lr``, ``data.train[0]``): no space, no
#: colon. A plugin's ``"lora.r: must be ..."`` is read as key ``lora.r``.
_KEY = re.compile(r"[^\s:]+")


@dataclass(frozen=True)
class Problem:
    """One problem with a recipe: ``key`` at fault (``train.lr``; None for the file as a
    whole), ``message`` (what is wrong; how to fix it) and ``where`` (``FILE`` or
    ``FILE:LINE`` when the place is in a file). Rendered as ``WHERE: KEY: MESSAGE``."""

    key: str | None
    message: str
    where: str | None = None

    def __str__(self) -> str:
        head = "".join(f"{part}: " for part in (self.where, self.key) if part is not None)
        return head + self.message

    @property
    def section(self) -> str | None:
        """The recipe section the key is in (``train`` of ``train.lr``)."""
        return None if self.key is None else self.key.split(".")[0]

    @classmethod
    def parse(cls, line: str) -> Problem:
        """A problem written as one line (a plugin's ``plugtune_check_recipe`` answer): its
        head before ``": "`` is the key where it looks like one. ``str()`` gives ``line`` back."""
        key, sep, message = line.partition(": ")
        if sep and _KEY.fullmatch(key):
            return cls(key, message)
        return cls(None, line)

    def capped(self, limit: int) -> Problem:
        """This problem with its line cut to ``limit`` characters (``... (cut)`` marks it)."""
        line = str(self)
        if len(line) <= limit:
            return self
        keep = limit - (len(line) - len(self.message))
        if keep < 0:
            return Problem(None, f"{line[:limit]}... (cut)")
        return replace(self, message=f"{self.message[:keep]}... (cut)")


def render(problems: list[Problem], source: object = None) -> str:
    """The text of a recipe's problems: one line when there is one (``SOURCE: PROBLEM``), else
    a count and one line per problem."""
    if len(problems) == 1:  # one problem, one line
        return f"{source}: {problems[0]}" if source else str(problems[0])
    where = f" in {source}" if source else ""
    return "\n".join([f"{len(problems)} problem(s){where}:"] + [f"  - {p}" for p in problems])


class RecipeError(PlugtuneError):
    """One or more problems with a recipe, all listed at once (exit status 2): one problem is
    one line, ``SOURCE: KEY: what is wrong; how to fix it``. ``details`` holds them as
    :class:`Problem` s, ``problems`` as their lines."""

    exit_code = 2

    def __init__(self, problems: Iterable[str | Problem], source: object = None) -> None:
        self.details = [p if isinstance(p, Problem) else Problem.parse(p) for p in problems]
        self.problems = [str(p) for p in self.details]
        self.source = source
        super().__init__(render(self.details, source))


class DataError(PlugtuneError):
    """A data file or record is unusable; the message names the file and line."""

    exit_code = 2


class InputError(PlugtuneError):
    """A bad input found outside the recipe's schema — a model source that cannot be loaded, a
    run directory that cannot be made — in one line naming the key or path (exit status 2)."""

    exit_code = 2


class PluginError(PlugtuneError):
    """A plugin failed to import or broke the hook contract; the message names it."""

    exit_code = 3


def first_line(exc: BaseException, limit: int | None = None, empty: str | None = None) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or, when it
    has none, ``empty`` (default: its type's name): what a one-line message quotes of an error
    from below."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if empty is None else empty
    return text.splitlines()[0][:limit]


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``" (did you mean 'lr'?)"`` for the candidate closest to ``word``, or ``""``."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
