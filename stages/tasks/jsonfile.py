"""Reading a data set's JSON file, with one-line errors for a missing or malformed one."""
from __future__ import annotations

import json
import os

from stages.errors import UserError


def read_json(fpath: str, missing: str):
    """The file's content; a UserError saying `missing` when there is no such file, or what the parser says."""
    if not os.path.isfile(fpath):
        raise UserError(missing)
    try:
        with open(fpath, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{fpath} is not valid JSON: {e}") from None
