"""The one exception type the CLI turns into a clean one-line message (no traceback)."""


class KosmoError(Exception):
    """A user-facing error. Its message names the file, line or field at fault."""
