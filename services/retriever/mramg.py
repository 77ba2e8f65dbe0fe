"""The MRAMG-Bench release layout: `doc_*.jsonl` lines `[id, content with <PIC> markers, images_list]`,
`images_info/*_imgs_collection.json` mapping image id to `image_path` and `image_caption`, image files under
`IMAGE/images/...`. Like every importer it never raises on bad input: it yields a `Skipped` with the reason."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.common.text import printable, unstorable
from services.retriever.sources import (
    MAX_DOCUMENT_BYTES,
    FileRefused,
    Item,
    LinkedImage,
    Skipped,
    SourceDocument,
    over_limit,
    read_regular_file,
    relative_name,
)


def read_mramg(root: Path) -> Iterator[Item]:
    catalogue: dict[str, dict[str, Any]] = {}
    for info_file in sorted((root / "images_info").glob("*.json")):
        try:
            entries = json.loads(read_regular_file(info_file).decode("utf-8"))
        except (FileRefused, OSError) as error:
            yield Skipped(printable(relative_name(info_file, root)), f"cannot read: {error}")
            continue
        except (ValueError, UnicodeDecodeError) as error:
            yield Skipped(relative_name(info_file, root), f"malformed image catalogue: {error}")
            continue
        if not isinstance(entries, dict):
            yield Skipped(relative_name(info_file, root), "image catalogue is not an object of image id -> info")
            continue
        for image_id, info in entries.items():
            problem = unstorable([image_id, info])
            if problem:
                where = f"{printable(relative_name(info_file, root))} entry {printable(str(image_id))[:80]}"
                yield Skipped(where, f"image catalogue entry {problem}")
            elif isinstance(info, dict):
                catalogue[str(image_id)] = info
    for doc_file in sorted(root.glob("doc_*.jsonl")):
        subset = doc_file.stem.removeprefix("doc_")
        if unstorable(doc_file.name):
            yield Skipped(printable(doc_file.name), "file name is not valid UTF-8 (rename it)")
            continue
        try:
            raw_lines = read_regular_file(doc_file).split(b"\n")
        except (FileRefused, OSError) as error:
            yield Skipped(doc_file.name, f"cannot read: {error}")
            continue
        for line_number, raw in enumerate(raw_lines, 1):
            if not raw.strip():
                continue
            where = f"{doc_file.name} line {line_number}"
            if len(raw) > MAX_DOCUMENT_BYTES:
                yield Skipped(where, f"{over_limit(len(raw), MAX_DOCUMENT_BYTES, 'document')} (split it)")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield Skipped(where, f"invalid UTF-8 at byte {error.start}")
                continue
            try:
                record = json.loads(line)
                doc_id, content, image_ids = record[0], record[1], record[2]
                if not isinstance(content, str) or not isinstance(image_ids, list):
                    raise TypeError("expected [id, text, [image ids]]")
                if problem := unstorable(record):
                    raise ValueError(problem)
            except (ValueError, IndexError, TypeError, KeyError) as error:
                yield Skipped(where, f"malformed line: {error}")
                continue
            doc_key = f"{subset}/{doc_id}"
            if not content.strip() and not image_ids:
                yield Skipped(where, "empty document")
                continue
            images: list[LinkedImage] = []
            pic_links: list[str] = []
            for image_id in image_ids:
                image_id = str(image_id)
                info = catalogue.get(image_id)
                if info is None or not info.get("image_path"):
                    yield Skipped(f"image {image_id} (in {doc_key})", "image id not in images_info", doc_key=doc_key)
                    pic_links.append(image_id)  # keeps the markers aligned; no file, so it is left out
                    continue
                found = resolve_mramg_image(str(info["image_path"]), root)
                pic_links.append(image_id)
                if isinstance(found, str):
                    yield Skipped(f"image {image_id} (in {doc_key})", found, doc_key=doc_key)
                    continue
                images.append(
                    LinkedImage(
                        link=image_id,
                        source_name=relative_name(found, root),
                        path=found,
                        caption=str(info.get("image_caption") or ""),
                    )
                )
            yield SourceDocument(
                doc_key=doc_key,
                markdown=content,
                source_path=where,
                title=None,
                images=images,
                pic_images=pic_links,
                meta={"subset": subset},
            )


def resolve_mramg_image(image_path: str, root: Path) -> Path | str:
    relative = image_path.lstrip("/")
    for base in (root, root / "IMAGE", root / "IMAGE" / "images"):
        candidate = (base / relative).resolve()
        if candidate.is_relative_to(root.resolve()) and candidate.is_file():
            if unstorable(relative_name(candidate, root)):
                return f"image file name is not UTF-8 ({printable(relative_name(candidate, root))})"
            return candidate
    return f"missing image file {image_path}"
