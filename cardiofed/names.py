"""Names that other parties choose (sites, studies): one safe character set.

A name starts with a letter or digit and has at most 64 letters, digits, ``_``, ``.``
and ``-``: it cannot be ``.`` or ``..``, hold a path separator, a space or a control
character, so it is harmless in a log line, a URL or a file name. Coordinator and node
both check names with it; the node still never builds a path from a name it was sent.
"""

from __future__ import annotations

import re

from cardiofed.exceptions import ConfigurationError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAME_RULE = "start with a letter or digit and have at most 64 letters, digits, '_', '.' or '-'"
_NAME = re.compile(NAME_PATTERN)


def is_safe_name(value: object) -> bool:
    """Whether `value` is a string in the safe character set (:data:`NAME_PATTERN`)."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def safe_name(value: object, what: str = "name") -> str:
    """`value` if it is a safe name; otherwise :class:`ConfigurationError` naming it."""
    if not is_safe_name(value):
        raise ConfigurationError(
            f"The {what} must {NAME_RULE}; got {value!r}.")
    return str(value)
