"""The one exception type for mistakes a user can fix (bad checkpoint, bad argument, bad prompt)."""


class DreamError(ValueError):
    """A user-fixable error; the CLI prints its message on one line and exits non-zero."""
