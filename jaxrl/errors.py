"""The one exception type for problems a user can fix (bad config, data, files, meshes), and the config
field check that raises it (light: reward worker processes import it without JAX)."""


class JaxrlError(Exception):
    """A user-facing error: the message names the problem and the fix. The CLI prints it and exits 1."""


class ConfigValueError(JaxrlError):
    """A field value out of range. `from_dict` prefixes `field` with its section's dotted path."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field = field
        self.message = message


def check_field(ok: bool, field: str, message: str) -> None:
    """Raises ConfigValueError unless `ok`; the message reads as '<field> <message>'."""
    if not ok:
        raise ConfigValueError(field, message)
