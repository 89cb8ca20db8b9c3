"""One exception type for problems a user can fix; the CLI prints it as a one-line error."""


class TinyshieldError(Exception):
    """Bad input or environment: the message names the problem and what to do."""
