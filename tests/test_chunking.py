"""Parsing and chunking, against hand-checked cases."""

import pytest

from services.common.text import parse_markdown, split_sentences
from services.retriever.chunking import chunk_document

pytestmark = pytest.mark.unit

RECIPE = """# Pancakes

![Stack of pancakes](images/pancakes.jpg)
Fluffy pancakes for a weekend breakfast. They take twenty minutes.

## Ingredients

- 200 g flour
- 2 eggs,
  beaten well
- 300 ml milk

## Directions

1. Mix the flour and the eggs.
2. Add the milk slowly, e.g. in three parts.

![Batter in a bowl](images/batter.jpg "Smooth batter")

3. Fry in a hot pan.
"""


def test_units_keep_structure():
    parsed = parse_markdown(RECIPE)
    kinds = [(unit.kind, unit.text) for unit in parsed.units]
    assert kinds[0] == ("heading", "Pancakes")
    assert ("sentence", "Fluffy pancakes for a weekend breakfast.") in kinds
    assert ("sentence", "They take twenty minutes.") in kinds
    # a list item with a continuation line stays one unit
    assert ("item", "- 2 eggs, beaten well") in kinds
    # numbered steps keep their numbers; "e.g." does not end a sentence inside a step
    assert ("item", "2. Add the milk slowly, e.g. in three parts.") in kinds
    assert parsed.title == "Pancakes"
    assert parsed.units[-1].heading_path == ("Pancakes", "Directions")


def test_image_positions_count_units_before_them():
    parsed = parse_markdown(RECIPE)
    first, second = parsed.images
    assert (first.source, first.position) == ("images/pancakes.jpg", 1)  # after the title
    assert parsed.units[second.position - 1].text == "2. Add the milk slowly, e.g. in three parts."
    assert parsed.units[second.position].text == "3. Fry in a hot pan."
    assert second.caption == "Smooth batter"  # the title wins over the alt text
    assert first.caption == "Stack of pancakes"
    assert "Add the milk slowly" in second.context_before
    assert second.context_after.startswith("3. Fry in a hot pan.")


def test_chunks_follow_sections_and_own_their_images():
    parsed = parse_markdown(RECIPE)
    chunks = chunk_document(parsed)
    assert [chunk.heading for chunk in chunks] == ["Pancakes", "Pancakes > Ingredients", "Pancakes > Directions"]
    assert chunks[0].image_indexes == [0]
    assert chunks[2].image_indexes == [1]
    assert chunks[2].text.startswith("Pancakes > Directions\n1. Mix")
    # chunks cover every unit once, in order
    covered = [i for chunk in chunks for i in range(chunk.first_unit, chunk.last_unit + 1)]
    assert covered == list(range(1, len(parsed.units) + 1))


def test_long_sections_split_between_units_only():
    body = "\n".join(f"{n}. Step number {n} does one careful thing with the dough." for n in range(1, 41))
    parsed = parse_markdown(f"# Bread\n\n{body}\n")
    chunks = chunk_document(parsed, max_words=60)
    assert len(chunks) > 3
    assert all(len(chunk.text.split()) <= 60 + 5 for chunk in chunks)  # + the repeated heading
    assert all(chunk.text.startswith("Bread") for chunk in chunks)


def test_sentence_splitting():
    assert split_sentences("Press the Q icon, e.g. the button. Then go 3.5 m away! Is it done? Yes.") == [
        "Press the Q icon, e.g. the button.",
        "Then go 3.5 m away!",
        "Is it done?",
        "Yes.",
    ]
    assert split_sentences("") == []


def test_pic_markers_take_their_images_in_order():
    from services.common.text import ImageRef

    text = "A cat sits on a mat. <PIC> The cat then sleeps.\n\nLater it wakes. <PIC>"
    parsed = parse_markdown(text, pic_images=[ImageRef(source="img1"), ImageRef(source="img2")])
    assert [(ref.source, ref.position) for ref in parsed.images] == [("img1", 1), ("img2", 3)]
    assert [unit.text for unit in parsed.units] == ["A cat sits on a mat.", "The cat then sleeps.", "Later it wakes."]


def test_html_img_tags_are_images():
    parsed = parse_markdown('Intro text.\n\n<img src="images/a.png" alt="A chart">\n\nMore text.')
    assert [(ref.source, ref.alt, ref.position) for ref in parsed.images] == [("images/a.png", "A chart", 1)]
