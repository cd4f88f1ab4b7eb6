"""Artifacts: the files a job leaves in its output directory for Kiln to store.

Kiln stores each artifact as object `<job_id>/<attempt>/<name>` of the bucket
`kiln_results_<model>`, so a name must be a plain file name; Kiln refuses any other (and
retries the job, as for any broken worker). The SDK checks names where they are first used, so
a bad one fails before the model spends its time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from .errors import ArtifactNameError

__all__ = ["Artifact", "MAX_ARTIFACT_NAME_BYTES", "check_artifact_name"]

#: Longest artifact name Kiln accepts (an object name's limit; names are ASCII, so bytes).
MAX_ARTIFACT_NAME_BYTES = 256

_NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_artifact_name(name: object) -> str:
    """Returns `name` if it is a valid artifact name, else raises `ArtifactNameError`.

    The rule is Kiln's (`core/src/engine/process.rs`): 1 to 256 of `A-Z a-z 0-9 - _ .`, and not
    `.` or `..`."""
    if (
        not isinstance(name, str)
        or len(name) > MAX_ARTIFACT_NAME_BYTES
        or not _NAME.fullmatch(name)
        or name in (".", "..")
    ):
        raise ArtifactNameError(
            f"artifact name {name!r} is not a plain file name: use 1 to {MAX_ARTIFACT_NAME_BYTES} "
            "of A-Z a-z 0-9 - _ . (no folders, not . or ..)"
        )
    return name


@dataclass(frozen=True)
class Artifact:
    """One file of a job's result, as the `result` line names it."""

    #: The name Kiln stores it under (a plain file name).
    name: str
    #: Where the file is: relative to the job's output directory, or absolute inside it.
    path: str
    #: Its media type; None lets Kiln guess from the name's extension.
    content_type: Optional[str] = None

    def __post_init__(self) -> None:
        check_artifact_name(self.name)
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"artifact {self.name!r}: path must be a non-empty string, got {self.path!r}")
        if self.content_type is not None and not isinstance(self.content_type, str):
            raise ValueError(f"artifact {self.name!r}: content_type must be a string, got {self.content_type!r}")

    def to_wire(self) -> Dict[str, Any]:
        """The artifact as the protocol's `result` line carries it."""
        wire: Dict[str, Any] = {"name": self.name, "path": self.path}
        if self.content_type is not None:
            wire["content_type"] = self.content_type
        return wire

    def file(self, output_dir: Path) -> Path:
        """The file this artifact names, for a job whose output directory is `output_dir`."""
        path = Path(self.path)
        return path if path.is_absolute() else output_dir / path
