"""The one exception type for problems a user can fix (bad config, data, files, meshes)."""


class JaxrlError(Exception):
    """A user-facing error: the message names the problem and the fix. The CLI prints it and exits 1."""
