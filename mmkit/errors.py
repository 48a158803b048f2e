"""User-facing errors.

A :class:`MmkitError` is a user mistake: the CLI prints it as one line on stderr,
``error: <file>:<line>: <field>: <what was expected>``, and exits with code 2.
Anything else escaping a command is a bug (traceback, exit code 1).
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_INCOMPLETE = 3


class MmkitError(Exception):
    """A user mistake, reported in one line without a traceback.

    ``file``, ``line`` and ``field`` locate the mistake; ``line`` may be an int
    (a line number) or a string such as ``"row 17"`` for tabular and hub inputs.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = None if file is None else str(file)
        self.line = line
        self.field = field

    def __str__(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(self.file if self.line is None else f"{self.file}:{self.line}")
        elif self.line is not None:
            parts.append(str(self.line))
        if self.field is not None:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)


class ConfigError(MmkitError):
    """A bad configuration key or value."""


class DataError(MmkitError):
    """A malformed input file, record or field."""


class ModelError(MmkitError):
    """A model that cannot be found or loaded as the requested kind."""


class MissingExtraError(MmkitError):
    """A feature needs an optional dependency that is not installed."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        super().__init__(f"{feature} needs the package {package!r}: pip install 'mmkit[{extra}]'")


def suggest(name: str, choices) -> str:
    """Return `` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
