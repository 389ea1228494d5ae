"""``--verbose``: ntrl's INFO log lines (for example which tangent backend answers each property)
on stderr, written through tqdm so that they do not break a progress bar."""

from __future__ import annotations

import logging
import sys


def enable_verbose() -> None:
    """Show ntrl's INFO log lines on stderr. Idempotent."""

    class TqdmHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)

    logger = logging.getLogger("ntrl")
    if not any(getattr(h, "ntrl_verbose", False) for h in logger.handlers):
        handler = TqdmHandler()
        handler.ntrl_verbose = True
        handler.setFormatter(logging.Formatter("ntrl: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
