"""The wire: protocol lines out to Kiln, and the limits both sides keep.

Kiln's side is `core/src/engine/process.rs`; the contract for every language is the section
"The process engine worker protocol" of docs/PROTOCOL.md.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Mapping, TextIO

__all__ = [
    "DEFAULT_PREVIEW_INTERVAL_MS",
    "LineTooLong",
    "LineWriter",
    "MAX_LINE_BYTES",
    "MAX_MESSAGE_CHARS",
    "MAX_PREVIEW_BYTES",
    "MAX_STAGE_CHARS",
    "MAX_STDIN_LINE_BYTES",
    "clip",
]

#: Kiln's limit for one stdout line: a longer line counts as a broken worker, which is killed.
MAX_LINE_BYTES = 1024 * 1024
#: Messages (logs, progress messages, error messages) are cut to this many characters. Kiln cuts
#: event messages to 4 KiB anyway; this bound keeps any line, even one whose every character
#: JSON escapes to 12 bytes, far under MAX_LINE_BYTES.
MAX_MESSAGE_CHARS = 16 * 1024
#: Stage names are cut to this many characters (Kiln keeps 128 bytes of one).
MAX_STAGE_CHARS = 1024
#: Longest stdin line the SDK reads. Kiln's job lines are bounded by its request limit (256 KiB
#: by default); anything far beyond that is a broken writer, not a job, and is skipped.
MAX_STDIN_LINE_BYTES = 4 * 1024 * 1024

#: Largest preview image, in bytes (before base64): Kiln drops a bigger one
#: (`kiln_contract::preview::MAX_PREVIEW_BYTES`).
MAX_PREVIEW_BYTES = 256 * 1024
#: The preview interval when the job line names none (an older Kiln).
DEFAULT_PREVIEW_INTERVAL_MS = 500

_ELLIPSIS = "…"


def clip(text: str, limit: int) -> str:
    """`text`, cut to at most `limit` characters, ending with "…" when it was cut."""
    if len(text) <= limit:
        return text
    return text[: max(0, limit - 1)] + _ELLIPSIS


class LineTooLong(ValueError):
    """A protocol line would be over MAX_LINE_BYTES (only a result naming thousands of
    artifacts can be: every text field is clipped)."""


class LineWriter:
    """Writes protocol lines, one JSON object a line, to the stream Kiln reads.

    Several threads write (the job's thread, the stdin reader's warnings, any thread of the
    model reporting progress), so each line is written and flushed whole under one lock."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message: Mapping[str, Any]) -> None:
        """Writes one line. Raises LineTooLong (writing nothing) if it would break Kiln's limit."""
        line = json.dumps(message, separators=(",", ":")) + "\n"
        # ensure_ascii (the default) makes the line ASCII, so characters are bytes.
        if len(line) > MAX_LINE_BYTES:
            raise LineTooLong(f"a {message.get('type')!r} line of {len(line)} bytes is over the protocol's {MAX_LINE_BYTES}")
        with self._lock:
            try:
                self._stream.write(line)
                self._stream.flush()
            except BrokenPipeError:
                # Kiln is gone (it closed our stdout): nobody is left to report to.
                os._exit(0)
