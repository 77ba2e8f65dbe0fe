"""Small corpora written on the fly: a Markdown folder with every kind of bad input, an MRAMG-Bench
release in miniature, and single files. Images are real PNG/JPEG bytes made with Pillow."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

from PIL import Image


def png(color: tuple[int, int, int], size: tuple[int, int] = (48, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(color: tuple[int, int, int], size: tuple[int, int] = (40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny file that claims 400 Mpx: the header alone is enough to refuse it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


GOOD_DOCS = {
    "pancakes": (
        "# Pancakes\n\n![A stack of pancakes](images/pancakes.png)\nFluffy pancakes for breakfast.\n\n"
        "## Directions\n\n1. Mix flour, eggs and milk into a batter.\n2. Fry each pancake in butter.\n\n"
        "![Pancake frying in a pan](images/frying.jpg)\n\n3. Serve with maple syrup.\n"
    ),
    "tomato-soup": (
        "# Tomato soup\n\nA warm soup of roasted tomatoes.\n\n![Bowl of red soup](images/soup.png)\n\n"
        "## Directions\n\n1. Roast the tomatoes with garlic.\n2. Blend with stock until smooth.\n"
    ),
    "bad-images": (
        "# Bad images\n\nThis page links images that are broken in every way.\n\n"
        "![missing](images/missing.png)\n\n![corrupt](images/corrupt.png)\n\n![text](images/notes.png)\n\n"
        "![bomb](images/bomb.png)\n\n![fine](images/fine.png)\n\nThe text still goes in.\n"
    ),
}


def write_markdown_corpus(root: Path) -> Path:
    (root / "docs").mkdir(parents=True)
    (root / "images").mkdir()
    for key, text in GOOD_DOCS.items():
        (root / "docs" / f"{key}.md").write_text(text)
    (root / "images" / "pancakes.png").write_bytes(png((250, 200, 120)))
    (root / "images" / "frying.jpg").write_bytes(jpeg((200, 150, 60)))
    (root / "images" / "soup.png").write_bytes(png((200, 30, 30)))
    (root / "images" / "fine.png").write_bytes(png((10, 200, 10)))
    good = png((1, 2, 3))
    (root / "images" / "corrupt.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "images" / "notes.png").write_bytes(b"these are not image bytes at all\n" * 10)
    (root / "images" / "bomb.png").write_bytes(bomb_png())
    (root / "docs" / "latin1.md").write_bytes("# Caf\xe9\n\nCr\xe8me br\xfbl\xe9e.\n".encode("latin-1"))
    (root / "docs" / "empty.md").write_text("   \n\n")
    (root / "docs.jsonl").write_text(
        json.dumps({"doc_id": "pancakes", "title": "Pancakes", "tags": ["breakfast"]})
        + "\n"
        + "{not json\n"
        + json.dumps({"doc_id": "tomato-soup", "title": "Tomato soup"})
        + "\n"
    )
    return root


def write_mramg_corpus(root: Path) -> Path:
    """doc_*.jsonl lines [id, text with <PIC>, [image ids]]; images_info/*_imgs_collection.json; IMAGE/images/."""
    (root / "images_info").mkdir(parents=True)
    (root / "IMAGE" / "images" / "toy").mkdir(parents=True)
    images = {
        "toy_1": ("toy/lighthouse.png", "A white lighthouse on a rocky coast", (240, 240, 240)),
        "toy_2": ("toy/harbour.png", "Fishing boats moored in a small harbour", (20, 60, 160)),
        "toy_3": ("toy/missing.png", "An image whose file is absent", None),
    }
    catalogue = {}
    for image_id, (path, caption, color) in images.items():
        catalogue[image_id] = {"image_path": path, "image_caption": caption}
        if color is not None:
            (root / "IMAGE" / "images" / path).write_bytes(png(color))
    (root / "images_info" / "toy_imgs_collection.json").write_text(json.dumps(catalogue))
    lines = [
        json.dumps(["d1", "The lighthouse guides ships at night. <PIC> It was built in 1850.", ["toy_1"]]),
        json.dumps(["d2", "Boats return at dusk. <PIC> The harbour is busy in summer. <PIC>", ["toy_2", "toy_3"]]),
        '["d3", "a line cut short',
        json.dumps(["d4", "", []]),
    ]
    (root / "doc_toy.jsonl").write_text("\n".join(lines) + "\n")
    return root


def stored_candidates(store, images: dict[str, bytes]) -> list:
    """Candidate images of a stored retrieval: each image's bytes in S3 (content-addressed), numbered ids."""
    from services.common.contracts import CandidateImage

    return [
        CandidateImage(
            image_id=number,
            source_name=name,
            s3_key=store.put_content(data, "image/png", prefix="images").key,
            caption=f"caption of {name}",
            context_before=None,
            context_after=None,
            doc_key="doc",
            score=1.0,
            reasons=["passage"],
        )
        for number, (name, data) in enumerate(images.items())
    ]
