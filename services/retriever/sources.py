"""Source documents as importers read them, and the one way a corpus file is read: only a regular file,
only up to its limit (a FIFO or device is refused before it is read, a growing file is caught)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A document is indexed in one message by one worker: 1 MiB of prose is ~170k words, ~1,100 chunks of
# 160 words, about a minute of embedding at the 17.6 texts/s measured on 2 cores (bench/README.md,
# ingestion throughput), far inside the 300 s visibility timeout; a bigger one is refused with its size.
MAX_DOCUMENT_BYTES = 1024 * 1024


class FileRefused(ValueError):
    """A path that is not read: not a regular file, or over its size limit; the message says which."""


def over_limit(size: int, limit: int, what: str = "file") -> str:
    return f"{what} is {size / 2**20:.1f} MiB, over the {limit / 2**20:g} MiB limit"


def read_regular_file(path: Path, limit: int | None = None) -> bytes:
    """The bytes of a regular file, read only when it is one and no bigger than `limit` (at most
    `limit` + 1 bytes are read, so a file growing meanwhile is caught too). Opened non-blocking: a
    FIFO is refused instead of waiting for a writer. OSError when it cannot be opened."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(descriptor, "rb") as handle:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a device or socket"
            raise FileRefused(f"not a regular file ({kind})")
        size = os.fstat(descriptor).st_size
        if limit is not None and size > limit:
            raise FileRefused(over_limit(size, limit))
        data = handle.read(-1 if limit is None else limit + 1)
    if limit is not None and len(data) > limit:
        raise FileRefused(over_limit(len(data), limit))
    return data


@dataclass
class LinkedImage:
    link: str  # the reference as the document writes it (path, or MRAMG image id)
    source_name: str  # path relative to the corpus root: the image's name in answers and evaluations
    path: Path
    caption: str = ""


@dataclass
class SourceDocument:
    doc_key: str
    markdown: str  # Markdown; `pic` documents use <PIC> markers that stand for `pic_images` in order
    source_path: str
    title: str | None = None
    images: list[LinkedImage] = field(default_factory=list)
    pic_images: list[str] = field(default_factory=list)  # links, in marker order (MRAMG)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Skipped:
    what: str  # the file, line or image concerned
    reason: str
    doc_key: str | None = None  # set when the document itself still goes in (a bad image of it)


Item = SourceDocument | Skipped


def relative_name(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()
