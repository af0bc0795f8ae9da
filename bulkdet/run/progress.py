"""Progress of `run` (and anything counting items and bytes): images/s, MB/s, ETA, failures so far.

On a terminal it is a tqdm bar (rate and ETA are tqdm's). When stderr is not a terminal (a log
file, a batch job) a bar's carriage returns only make noise, so one plain log line is written
every `LOG_EVERY_S` seconds and at the end instead. `quiet` shows nothing.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("bulkdet")
LOG_EVERY_S = 30.0


class Progress:
    def __init__(self, total: int, desc: str = "run", unit: str = "img", quiet: bool = False, stream=None):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.done = 0
        self.bytes = 0
        self.failed = 0
        self.t0 = time.perf_counter()
        self._last_log = self.t0
        stream = stream or sys.stderr
        self.quiet = quiet
        self.bar = None
        if not quiet and stream.isatty():
            self.bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, file=stream)

    def update(self, n: int, nbytes: int = 0, failed: int = 0) -> None:
        self.done += n
        self.bytes += nbytes
        self.failed += failed
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(self._postfix(), refresh=False)
        elif not self.quiet and time.perf_counter() - self._last_log >= LOG_EVERY_S:
            self._log()

    def _elapsed(self) -> float:
        return max(time.perf_counter() - self.t0, 1e-9)

    def _postfix(self) -> str:
        return f"{self.bytes / 1e6 / self._elapsed():.1f} MB/s, {self.failed} failed"

    def line(self) -> str:
        """One plain line: done/total, rate, MB/s, ETA, failures."""
        elapsed = self._elapsed()
        rate = self.done / elapsed
        left = self.total - self.done
        eta = tqdm.format_interval(left / rate) if rate > 0 and left > 0 else "0:00"
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        return (f"{self.desc}: {self.done}/{self.total} {self.unit}{share}, {rate:.1f} {self.unit}/s, "
                f"{self._postfix()}, ETA {eta}")

    def _log(self) -> None:
        self._last_log = time.perf_counter()
        log.info("%s", self.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            self.bar.close()
        elif not self.quiet and self.done:
            self._log()
