"""The one exception type for problems a user can fix (bad config, data, files, meshes), and the config
field check that raises it (light: reward worker processes import it without JAX)."""


class JaxrlError(Exception):
    """A user-facing error: the message names the problem and the fix. The CLI prints it and exits 1."""


class ConfigValueError(JaxrlError):
    """A field value out of range. `field` is its key within its section, which `from_dict` joins to the
    section's dotted path; `section` names the section for a section built directly (its own config key,
    e.g. 'optim'), and is replaced by that path when `from_dict` builds it."""

    def __init__(self, field: str, message: str, section: str = ""):
        super().__init__(f"{section}.{field} {message}" if section else f"{field} {message}")
        self.field = field
        self.message = message


def check_field(ok: bool, field: str, message: str, section: str = "") -> None:
    """Raises ConfigValueError unless `ok`; the message reads as '[<section>.]<field> <message>'."""
    if not ok:
        raise ConfigValueError(field, message, section)
