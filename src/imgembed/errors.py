"""The one exception type for mistakes the user can fix (bad data, bad paths, bad weights)."""


class UserError(Exception):
    """Shown to the user as a single line, with a non-zero exit and no traceback."""
