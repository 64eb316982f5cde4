"""The log of `luigi --module tasks ...` (installed by logging.cfg): short on the terminal, whole in a file.

The terminal gets the stages (task started / done / failed), the stages' own INFO lines, warnings, and one last
line: what failed and what to do, or that all is done. Luigi's scheduler chatter and tracebacks go only to the
full log, a file under ``<cache_dir>/logs/`` opened when the first task starts work (a command stopped by the
preflight writes nothing); the last line names it on failure.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

_SUMMARY = "===== Luigi Execution Summary ====="
_HANDLERS: list["ConsoleHandler"] = []
_FULL: list["FullLogHandler"] = []


def exception_text(traceback_text: str) -> str:
    """The exception part (type: message, every line of it) at the end of a formatted traceback."""
    lines = traceback_text.rstrip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    i = frames[-1] + 1 if frames else 0
    while i < len(lines) and lines[i].startswith("    "):  # the frame's source line and its ^^^ markers
        i += 1
    return "\n".join(lines[i:]).strip()


class FullLogHandler(logging.Handler):
    """Every record, kept in memory until ``open_full_log`` names the file, then appended to it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.buffer: list[str] = []
        self.path: Path | None = None
        _FULL.append(self)

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record) + "\n"
        if self.path is None:
            self.buffer.append(line)
        else:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        if record.name.startswith("luigi") and _SUMMARY in record.getMessage():  # the command's end
            self.buffer, self.path = [], None

    def open(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(self.buffer)
        self.buffer, self.path = [], path


def open_full_log(cache_dir: str | Path) -> Path | None:
    """Start writing the full log to ``<cache_dir>/logs/<time>-<pid>.log`` (once); its path, or None when the
    command's logging is not this module's."""
    for h in _FULL:
        if h.path is None:
            h.open(Path(cache_dir) / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
        return h.path
    return None


def quiet_interrupt() -> None:
    """Ctrl-C ends a command with one FAILED line (the traceback goes to the full log), not a screen of Python."""
    previous = sys.excepthook
    if getattr(previous, "defrag_interrupt", False):
        return

    def hook(kind, value, tb) -> None:
        if not issubclass(kind, KeyboardInterrupt):
            return previous(kind, value, tb)
        import traceback

        full = next((h.path for h in _FULL if h.path), None)
        if full is not None:
            with open(full, "a", encoding="utf-8") as f:
                f.write("".join(traceback.format_exception(kind, value, tb)))
        sys.stderr.write("\nFAILED: interrupted (Ctrl-C). Run the same command again: finished shards, checkpoints "
                         "and epochs are kept (training goes on with --resume)."
                         + (f" Full log: {full}" if full else "") + "\n")

    hook.defrag_interrupt = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def at_success(callback: Callable[[], None]) -> None:
    """Call ``callback`` (which prints the command's result) after a run that ended well."""
    for h in _HANDLERS:
        h.on_success.append(callback)


class ConsoleHandler(logging.Handler):
    """The short log on stderr; ends with one line saying how the command ended."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.failures: list[str] = []  # "what failed: why" (tasks log them with extra={"failure": ...})
        self.preflight = False
        self.on_success: list[Callable[[], None]] = []
        _HANDLERS.append(self)

    def write(self, text: str) -> None:
        stream = sys.stderr  # looked up each time: whoever holds stderr now (a test's capture, a redirect)
        stream.write(text + "\n")
        stream.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.short(record)
            if text:
                self.write(text)
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)

    def short(self, record: logging.LogRecord) -> str | None:
        msg = record.getMessage()
        if hasattr(record, "failure"):
            self.failures.append(record.failure)
        if record.name.startswith("luigi"):
            if "Uncaught exception in luigi" in msg:  # before any task: a parameter value luigi cannot read
                error = exception_text(self.format_exception(record)) or msg
                return (f"FAILED before any work: {error.splitlines()[0]}. Check the values given on the "
                        "command line (`luigi --module tasks <Task> --help` lists each parameter with its type "
                        "and default) and run it again.")
            if _SUMMARY in msg:
                return self.last_line(":)" in msg)
            if record.levelno >= logging.WARNING and "due to error in" in msg:  # complete() / requires()
                error = exception_text(msg)
                if "PreflightError: " in error.splitlines()[0]:
                    self.preflight = True
                    return error.split("PreflightError: ", 1)[1]
                what = msg.split(" or any dependencies", 1)[0].replace("Will not run ", "")
                self.failures.append(f"{what.split('(', 1)[0]} could not be scheduled: {error}")
                return f"cannot schedule {what.split('(', 1)[0]}: {error}"
            return None  # scheduler chatter and task tracebacks: the full log has them
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {msg}"
        if record.name.startswith(("defrag", "pipeline", "model", "data")):
            return f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {msg}"
        return None

    @staticmethod
    def format_exception(record: logging.LogRecord) -> str:
        if record.exc_info:
            return logging.Formatter().formatException(record.exc_info)
        return record.exc_text or ""

    def last_line(self, ok: bool) -> str:
        if ok:
            for callback in self.on_success:
                callback()
            return "done."
        full = next((h.path for h in _FULL if h.path), None)
        log = f" Full log: {full}" if full else ""
        if self.preflight:
            return "FAILED before any work: fix the problems listed above and run the same command again."
        if self.failures:
            first = self.failures[0].splitlines()[0]
            more = f" (and {len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
            return (f"FAILED: {first}{more}. Fix that and run the same command again: finished work is kept."
                    f"{log}")
        return f"FAILED: some tasks did not run (see the summary in the full log).{log}"
