"""Progress while decoding many files: one log line saying what and how many, a tqdm bar on a
terminal's stderr (``leave=False``, so nothing stays behind), and a line with the time taken.

Lines go to the ``metamm`` logger at INFO; where nothing configures logging (``metamm data``,
a script), they are printed to stdout, the way a training run's console log shows them.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

log = logging.getLogger("metamm")
T = TypeVar("T")


def say(message: str) -> None:
    """``message`` on the metamm log at INFO, or on stdout where no logging is configured."""
    if log.hasHandlers():
        log.info(message)
    else:
        print(message, flush=True)


def decoding(items: Iterable[T], what: str, total: Optional[int] = None) -> Iterator[T]:
    """``items``, announcing ``decoding {total} {what}`` first and ``decoded ... in T s`` once
    they are exhausted, with a progress bar between (stderr, only on a terminal)."""
    from tqdm import tqdm

    n = total if total is not None else len(items)  # type: ignore[arg-type]
    say(f"decoding {n} {what}")
    start = time.perf_counter()
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    bar = tqdm(items, total=n, desc="decoding", unit="file", leave=False, mininterval=0.5,
               file=sys.stderr, disable=not tty, dynamic_ncols=True)
    try:
        yield from bar
    finally:
        bar.close()
    say(f"decoded {n} {what} in {time.perf_counter() - start:.1f} s")
