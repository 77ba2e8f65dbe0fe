"""Answers cut from whole sections (issue 13): sections of a document, what a question's answer holds,
where a length budget may cut, and images placed back where they stood — pure functions, no server."""

from __future__ import annotations

import doctest

import pytest

import services.retriever.sections as sections_module
from services.common.contracts import AnswerUnit, CandidateImage, Retrieval, SourceSection, UnitSource
from services.common.text import parse_markdown
from services.common.vectors import QueryVectors
from services.generator.core import extractive
from services.inserter.core import provenance_rule_plan, source_plan
from services.retriever.sections import (
    StoredUnit,
    answer_units,
    document_sections,
    section_body,
    wants_subsections,
)

pytestmark = pytest.mark.unit

RECIPE = """# Apple Pie

![Apple pie](images/apple-pie.jpg)

- Prep time: 30 min

## Ingredients

- 900 g apples
- 50 g sugar

## Directions

1. Peel the apples.
2. Mix them with the sugar.
3. Bake for 45 minutes.

## Notes

Serve warm.
"""

MANUAL = """# Fly View

The Fly View is used to fly.

![Fly view](images/fly.jpg)

## Camera

The camera panel takes photos.

![Camera panel](images/camera.jpg)

## Video Stream

The video stream shows what the camera sees.
"""


def units_of(markdown: str) -> list[StoredUnit]:
    return [StoredUnit(u.kind, u.text, u.level) for u in parse_markdown(markdown).units]


def by_label(units: list[StoredUnit]):
    return {section.label: section for section in document_sections(units)}


def test_doctests_of_the_sections_module():
    result = doctest.testmod(sections_module)
    assert result.attempted > 0 and result.failed == 0


def test_a_procedure_question_gets_the_recipe_with_its_sub_sections():
    units = units_of(RECIPE)
    title = by_label(units)["Apple Pie"]
    assert wants_subsections(title, units, "How do I make Apple Pie?")
    numbers, cut = section_body(title, units, subsections=True)
    texts = [units[n - 1].text for n in numbers]
    assert not cut
    assert texts == [
        "- Prep time: 30 min",  # the section's own text (its heading line is the question's title)
        "Ingredients",
        "- 900 g apples",
        "- 50 g sugar",
        "Directions",
        "1. Peel the apples.",
        "2. Mix them with the sugar.",
        "3. Bake for 45 minutes.",
        "Notes",
        "Serve warm.",
    ]


def test_a_what_is_question_gets_the_sections_own_text_only():
    units = units_of(MANUAL)
    page = by_label(units)["Fly View"]
    assert not wants_subsections(page, units, "What is Fly View?")
    assert not wants_subsections(page, units, "Fly View: Camera?")
    numbers, _ = section_body(page, units, subsections=False)
    assert [units[n - 1].text for n in numbers] == ["The Fly View is used to fly."]


def test_a_numbered_procedure_is_never_cut_mid_way():
    steps = "\n".join(f"{n}. Step number {n} of the long procedure here." for n in range(1, 13))
    units = units_of(f"# Setup\n\nRead this first.\n\n{steps}\n\nThen you are done.\n\nEnjoy flying.\n")
    section = by_label(units)["Setup"]
    numbers, cut = section_body(section, units, subsections=False, max_words=60)
    # the list does not fit after the first line: the answer stops before it, never inside it
    assert cut and [units[n - 1].text for n in numbers] == ["Read this first."]
    # a list that opens the answer is kept whole, however long, and the cut comes after it
    units = units_of(f"# Setup\n\n{steps}\n\nThen you are done.\n")
    numbers, cut = section_body(by_label(units)["Setup"], units, subsections=False, max_words=30)
    texts = [units[n - 1].text for n in numbers]
    assert cut and texts == [f"{n}. Step number {n} of the long procedure here." for n in range(1, 13)]
    numbers, cut = section_body(by_label(units)["Setup"], units, subsections=False)
    assert not cut and [units[n - 1].text for n in numbers][-1] == "Then you are done."


def test_sub_sections_are_cut_whole_and_the_cut_is_marked():
    units = units_of(RECIPE)
    title = by_label(units)["Apple Pie"]
    numbers, cut = section_body(title, units, subsections=True, max_words=15)
    texts = [units[n - 1].text for n in numbers]
    assert cut and texts == ["- Prep time: 30 min", "Ingredients", "- 900 g apples", "- 50 g sugar"]


def section_of(markdown: str, label: str, question: str, document_id: int = 7) -> SourceSection:
    units = units_of(markdown)
    sections = document_sections(units)
    section = {s.label: s for s in sections}[label]
    numbers, cut = section_body(section, units, subsections=wants_subsections(section, units, question))
    return SourceSection(
        document_id=document_id,
        doc_key="doc",
        path=label,
        level=section.level,
        units=answer_units(numbers, units, sections, document_id, "doc"),
        truncated=cut,
        score=1.0,
        evidence={"heading_similarity": 0.9, "heading_terms": 1.0},
    )


def image(name: str, position: int, document_id: int = 7, image_id: int = 1) -> CandidateImage:
    return CandidateImage(
        image_id=image_id,
        source_name=name,
        s3_key=f"k/{name}",
        caption=name,
        context_before="unrelated words",
        context_after="more unrelated words",
        doc_key="doc" if document_id == 7 else "other",
        score=0.5,
        reasons=["section"],
        document_id=document_id,
        position=position,
    )


def positions_in(markdown: str) -> dict[str, int]:
    return {ref.source: ref.position for ref in parse_markdown(markdown).images}


def test_images_go_back_exactly_where_they_stood_lead_image_first():
    section = section_of(RECIPE, "Apple Pie", "How do I make Apple Pie?")
    lead = image("images/apple-pie.jpg", positions_in(RECIPE)["images/apple-pie.jpg"])
    plan = source_plan(section.units, [lead])
    assert [(p.image, p.after, p.evidence) for p in plan] == [("images/apple-pie.jpg", 0, "source")]


def test_images_of_other_sections_of_the_same_document_stay_out():
    section = section_of(MANUAL, "Fly View", "What is Fly View?")
    where = positions_in(MANUAL)
    candidates = [
        image("images/camera.jpg", where["images/camera.jpg"], image_id=2),
        image("images/fly.jpg", where["images/fly.jpg"]),
    ]
    # no embedder needed: every candidate is of the answer's own document
    plan = provenance_rule_plan(section.units, candidates, vectors=None)
    assert [(p.image, p.after) for p in plan] == [("images/fly.jpg", 1)]


def test_the_extractive_answer_is_the_section_and_says_so():
    section = section_of(RECIPE, "Apple Pie", "How do I make Apple Pie?")
    retrieval = Retrieval(
        collection="c", question="How do I make Apple Pie?", passages=[], candidates=[], sections=[section]
    )
    units, mode, answered, reason = extractive(retrieval, QueryVectors(None))
    assert mode == "section" and answered == ["Apple Pie"] and "Apple Pie" in reason
    assert all(unit.source is not None and unit.source.doc_key == "doc" for unit in units)
    assert [u.kind for u in units if u.text == "Ingredients"] == ["heading"] and units[1].level == 2


def test_a_cut_answer_ends_with_a_line_that_says_where_the_rest_is():
    section = section_of(RECIPE, "Apple Pie", "How do I make Apple Pie?").model_copy(update={"truncated": True})
    retrieval = Retrieval(
        collection="c", question="How do I make Apple Pie?", passages=[], candidates=[], sections=[section]
    )
    units, *_ = extractive(retrieval, QueryVectors(None))
    assert units[-1].source is None and "continues in doc" in units[-1].text


def test_units_without_provenance_are_placed_by_source_only_when_they_have_it():
    lm_units = [AnswerUnit(text="Peel the apples."), AnswerUnit(text="Bake.")]
    assert source_plan(lm_units, [image("images/apple-pie.jpg", 1)]) == []
    sourced = [AnswerUnit(text="Peel.", source=UnitSource(document_id=7, doc_key="doc", position=9))]
    # an image right after unit 9 goes after it; one right before it (position 8) goes before it
    plan = source_plan(sourced, [image("a.jpg", 9), image("b.jpg", 8, image_id=2)])
    assert [(p.image, p.after) for p in plan] == [("b.jpg", 0), ("a.jpg", 1)]


def test_a_pic_marker_inside_a_list_item_stands_after_that_item():
    from services.common.metrics import parse_gold_answer

    gold = "Steps:\n\n1. Click it\n   <PIC>\n   > Note this.\n1. Then <PIC> this.\n\nDone. <PIC>"
    units, positions = parse_gold_answer(gold, ["a.jpg", "b.jpg", "c.jpg"])
    assert units == ["Steps:", "1. Click it > Note this.", "1. Then this.", "Done."]
    # as the same document with real image links parses: each image after the item that holds it
    assert positions == {"a.jpg": 2, "b.jpg": 3, "c.jpg": 4}
    source = parse_markdown("Steps:\n\n1. Click it\n   ![](a.jpg)\n   > Note this.\n1. Then ![](b.jpg) this.\n")
    assert [(ref.source, ref.position) for ref in source.images] == [("a.jpg", 2), ("b.jpg", 3)]
