"""Two exception types: what the user can fix, and what only a fix to tinyshield can.

The CLI prints a `TinyshieldError` as a one-line error (exit 2) and an `InternalError` as a bug
report request (exit 3), so a broken invariant is never mistaken for a bad flag."""


class TinyshieldError(Exception):
    """Bad input or environment: the message names the problem and what to do."""


class InternalError(Exception):
    """An invariant of tinyshield itself failed (a planner overlap, a schedule call that does not fit its
    kernel): a bug in tinyshield, not in the user's input. The message says what broke; str() adds
    what to report."""

    REPORT = ("this is a bug in tinyshield, not in your input: please report it with the command line you "
              "ran, this message and the model (or its config.json)")

    def __str__(self) -> str:
        return f"{super().__str__()} — {self.REPORT}"
