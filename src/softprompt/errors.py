"""User-facing errors: one line that names the problem and the fix."""

import dataclasses
import difflib


class SoftPromptError(Exception):
    """A mistake in what the user passed (file, name, input). The CLI prints it as one line, no traceback."""


def check_keys(values: dict, cls: type, where: str) -> None:
    """Refuse a key that is not a field of the dataclass `cls`, naming the closest valid one."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {where + '.' if where else ''}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise SoftPromptError(f"unknown config key {where + '.' if where else ''}{key}{hint}")
