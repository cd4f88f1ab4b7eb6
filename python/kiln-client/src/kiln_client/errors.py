"""The one exception type of the client: a coded `KilnError`.

Kiln answers a failed request with the error envelope `{"error": {"code", "message"}}`
(docs/PROTOCOL.md, "Errors"); the client raises it as `KilnError(code, message)`. Branch on
`code`, which is stable; `message` is for people. `quota_exceeded` also says when to try
again: `KilnError.retry_after_ms` (None for the other codes).

The client adds a few codes of its own for failures that never reached Kiln or that it found
itself. They are listed in `ErrorCode` next to Kiln's and never clash with them.
"""

from __future__ import annotations

from typing import Optional


class ErrorCode:
    """The stable error codes, as string constants (`KilnError.code` is a plain `str`)."""

    # Kiln's own (docs/PROTOCOL.md, "Errors").
    BAD_REQUEST = "bad_request"
    UNKNOWN_MODEL = "unknown_model"
    NOT_FOUND = "not_found"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    OVERLOADED = "overloaded"
    QUOTA_EXCEEDED = "quota_exceeded"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    ENGINE_FAILED = "engine_failed"
    INTERNAL = "internal"

    # The client's own.
    UNREACHABLE = "unreachable"
    """No NATS server could be reached (or it refused the connection) within the timeout."""
    NO_RESPONDERS = "no_responders"
    """No Kiln node listens on the API subject (none is up, or the prefix is wrong)."""
    TIMEOUT = "timeout"
    """A request got no reply in time, or a wait ran past its limit."""
    BAD_REPLY = "bad_reply"
    """A reply that is not Kiln's JSON (something else answers on the subject)."""
    SHA256_MISMATCH = "sha256_mismatch"
    """A downloaded artifact's content does not have the sha256 Kiln recorded."""
    FILE_EXISTS = "file_exists"
    """A download would replace a file of other content (pass `overwrite=True` to allow it)."""


class KilnError(Exception):
    """An error reply from Kiln, or a client-side failure with one of `ErrorCode`'s codes."""

    code: str
    message: str
    retry_after_ms: Optional[int]
    """When trying again may succeed, in milliseconds (`quota_exceeded`); else None."""

    def __init__(self, code: str, message: str, retry_after_ms: Optional[int] = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms

    def __repr__(self) -> str:
        retry = f", retry_after_ms={self.retry_after_ms!r}" if self.retry_after_ms is not None else ""
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r}{retry})"

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Exceptions pickle their args; ours are (code, message, retry_after_ms), not the joined string.
        return (type(self), (self.code, self.message, self.retry_after_ms))


class ChecksumError(KilnError):
    """A downloaded artifact failed its sha256 check; nothing was written at its path."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.SHA256_MISMATCH, message)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.message,))
