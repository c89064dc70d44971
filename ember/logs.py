"""Logging for ember's own processes (the CLI, torchrun workers): a stderr handler on the "ember" logger.

`import ember` configures nothing: an application (or a test's caplog) decides where ember's records go;
until then Python's last-resort handler still prints warnings. The entry points that are whole programs
call `configure_logging()` first, so their INFO lines (what is loading, where it is serving) are shown.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record (as logging's last resort does), so
    a redirect or capture set up after configure_logging() still gets the lines."""

    def __init__(self, level: int = logging.NOTSET):
        logging.Handler.__init__(self, level)

    @property
    def stream(self):
        return sys.stderr


def configure_logging(level: int = logging.INFO) -> logging.Logger:
    """Show ember's records at `level` and above on stderr, as `LEVEL HH:MM:SS name: message`.

    Idempotent: a second call only sets the level. Records still propagate to the root logger, so a
    handler configured there (an embedding application's, pytest's caplog) sees them too."""
    logger = logging.getLogger("ember")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
        logger.addHandler(handler)
    logger.setLevel(level)
    return logger
