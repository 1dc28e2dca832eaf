"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class NpusimError(Exception):
    """A user-facing error: bad input, an impossible configuration, a malformed file."""
