"""How every command line ends (`run`, `fetch` and the three converters).

A command's work returns what it prints on stdout, the paths it wrote, one a line, and the exit code is
0. A mistake the user can fix is a ValueError (ConfigError, MediaError, WeightsError, FetchError, ...):
one line `error: ...` on stderr, exit code 2, never a traceback. Each command adds its own other endings
around this one: an interrupt, and for `run` a lost rank and running out of memory.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable

SILENT_RANK_DELAY = 2.0  # seconds a rank that does not print a mistake waits before it exits


def exit_code(work: Callable[[], Iterable[object]], reports: bool = True) -> int:
    """Do `work` and print what it returns, one a line: 0. A ValueError: `error: <its message>` on stderr
    (only where `reports`: under torchrun, on the first rank of each node), 2."""
    try:
        results = work()
    except ValueError as err:
        if reports:
            print(f"error: {err}", file=sys.stderr)
        else:  # torchrun stops every rank once one exits: the rank that reports must get to print first
            time.sleep(SILENT_RANK_DELAY)
        return 2
    for result in results:
        print(result)
    return 0
