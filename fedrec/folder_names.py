"""Names that become folder or file names: a merchant's (its export half, its bundle) and a node's
(its key files). They come from data (a purchase file's merchant column), so a name must not climb
out of the folder it is written in ("../x", "a/b"), and must not be a control character or blank."""

from __future__ import annotations

import re

UNSAFE = r"[/\\\x00-\x1f\x7f]"  # a separator or a control character, anywhere in the name
MAX_BYTES = 200  # file systems allow 255 bytes a name; the key file adds ".pub", a temporary file more
RULE = f"no '/', '\\', control characters or surrounding spaces, not '.' or '..', at most {MAX_BYTES} bytes"


def folder_name_problem(name: str) -> str | None:
    """Why `name` cannot be a folder name under a folder of ours, or None when it can."""
    if not name or name != name.strip():
        return "is blank or has surrounding spaces"
    if name in (".", ".."):
        return f"is {name!r}"
    if re.search(UNSAFE, name):
        return "holds a separator ('/' or '\\') or a control character"
    if len(name.encode("utf-8")) > MAX_BYTES:
        return f"is longer than {MAX_BYTES} bytes"
    return None
