"""Progress bars that stay readable in a cluster job's log.

On a terminal tqdm redraws the bar in place; written to a file, every redraw is kept, so a long run's
log fills with thousands of bars. Off a terminal the bar is therefore drawn at most every 30 s.
That holds for update() only: set_postfix() and set_description() redraw at once unless given
refresh=False, so a loop that sets them every step passes it and lets update() draw.
"""
from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


def progress(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs), drawn at most every LOG_INTERVAL_S seconds when stderr is not a terminal."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(iterable, **kwargs)
