"""Errors a user can cause and fix. The CLI prints them as one line; the UI shows them as-is."""


class UserError(Exception):
    """Bad input or configuration: shown to the user without a traceback."""


class MediaError(UserError):
    """A file that is not a usable image or video (corrupt, truncated, empty, too large, ...)."""


class ModelLoadError(UserError):
    """A checkpoint that cannot be found or read."""
