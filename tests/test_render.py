"""The merger's rendering: answer units become typed blocks, Markdown and an HTML page whose text went
through markdown-it. Document text is hostile: nothing in it may become a tag, a handler or a link to a
script. Pure functions, no servers (images come from a dict standing in for S3)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from services.common.contracts import (
    AnswerBlock,
    AnswerUnit,
    CandidateImage,
    InsertionPlan,
    Placement,
    UnitSource,
)
from services.common.storage import ObjectMissing
from services.merger.core import interleave, merge, to_html, to_markdown
from tests.corpus_fixtures import png

pytestmark = pytest.mark.unit

VOID = {"img", "br", "hr", "meta", "input", "link", "source", "wbr", "col", "area", "base", "embed", "track"}
HOSTILE = "<script>alert(1)</script> and <img src=x onerror=alert(1)>"


class Element:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Element | None):
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Element] = []
        self.text = ""

    def ancestors(self) -> list[str]:
        found, node = [], self.parent
        while node is not None:
            found.append(node.tag)
            node = node.parent
        return found

    def all_text(self) -> str:
        return self.text + "".join(child.all_text() for child in self.children)


class Tree(HTMLParser):
    """The page as a tree of elements; a close tag that does not close the innermost open element is
    an error (what a browser would have to repair)."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.root = Element("#root", {}, None)
        self.open = self.root
        self.elements: list[Element] = []
        self.errors: list[str] = []
        self.feed(page)
        self.close()
        if self.open is not self.root:
            self.errors.append(f"unclosed <{self.open.tag}>")

    def handle_starttag(self, tag, attrs):
        element = Element(tag, dict(attrs), self.open)
        self.open.children.append(element)
        self.elements.append(element)
        if tag not in VOID:
            self.open = element

    def handle_endtag(self, tag):
        if tag != self.open.tag:
            self.errors.append(f"</{tag}> closes <{self.open.tag}>")
            return
        self.open = self.open.parent or self.root

    def handle_data(self, data):
        self.open.text += data

    def find(self, tag: str) -> list[Element]:
        return [element for element in self.elements if element.tag == tag]


class DictStore:
    """The one call `to_html` makes of an ObjectStore."""

    def __init__(self, objects: dict[str, bytes]):
        self.objects = objects

    def get(self, key: str) -> bytes:
        if key not in self.objects:
            raise ObjectMissing(key)
        return self.objects[key]


def candidate(name: str, caption: str | None) -> CandidateImage:
    return CandidateImage(
        image_id=abs(hash(name)) % 1000,
        source_name=name,
        s3_key=f"objects/{name}",
        caption=caption,
        context_before=None,
        context_after=None,
        doc_key="doc",
        score=1.0,
        reasons=["passage"],
    )


FRYING = candidate("images/frying.png", "Pancake frying in a pan")
STORE = DictStore({FRYING.s3_key: png((200, 120, 40))})


def plan(*placements: tuple[str, int]) -> InsertionPlan:
    return InsertionPlan(backend="rule", placements=[Placement(image=name, after=after) for name, after in placements])


def page_of(units: list[AnswerUnit], *placements: tuple[str, int], candidates=(FRYING,)) -> tuple[str, Tree]:
    blocks = interleave(units, plan(*placements), list(candidates))
    page, warnings = to_html("How do I fry?", blocks, list(candidates), STORE)
    assert warnings == []
    tree = Tree(page)
    assert tree.errors == []
    return page, tree


def body_tags(tree: Tree) -> list[str]:
    """The tags directly in <body>, in order."""
    (body,) = tree.find("body")
    return [child.tag for child in body.children]


def test_markdown_constructs_become_real_html():
    units = [
        AnswerUnit(text="Ingredients", kind="heading", level=1),
        AnswerUnit(text="- flour", kind="item"),
        AnswerUnit(text="- milk", kind="item"),
        AnswerUnit(text="Tips", kind="heading", level=3),
        AnswerUnit(text="Use *cold* milk and **fresh** eggs, see [the guide](https://example.org/guide)."),
        AnswerUnit(text="Run `fry --hot` first."),
        AnswerUnit(text="1. Mix the batter.", kind="item"),
        AnswerUnit(text="  - Sift the flour.", kind="item"),
        AnswerUnit(text="2. Fry it.", kind="item"),
        AnswerUnit(text="| step | minutes |\n| --- | --- |\n| fry | 2 |", kind="table"),
        AnswerUnit(text="```python\nfry(pan)\n```", kind="code"),
    ]
    page, tree = page_of(units)
    assert body_tags(tree) == ["h1", "h2", "ul", "h3", "p", "ol", "table", "pre"]
    assert [h.all_text() for h in tree.find("h2")] == ["Ingredients"]  # a source h1 is below the question's
    assert [h.all_text() for h in tree.find("h3")] == ["Tips"]
    (bullets, nested) = tree.find("ul")
    assert [li.all_text() for li in bullets.children] == ["flour", "milk"]
    (steps,) = tree.find("ol")
    assert [li.tag for li in steps.children] == ["li", "li"] and "start" not in steps.attrs
    assert nested.parent is steps.children[0]  # the sifting step nests under mixing
    assert nested.children[0].all_text() == "Sift the flour."
    assert [e.all_text() for e in tree.find("em")] == ["cold"]
    assert [e.all_text() for e in tree.find("strong")] == ["fresh"]
    assert [(a.attrs["href"], a.all_text()) for a in tree.find("a")] == [("https://example.org/guide", "the guide")]
    assert [c.all_text() for c in tree.find("code")] == ["fry --hot", "fry(pan)\n"]
    assert tree.find("code")[1].parent.tag == "pre" and tree.find("code")[1].attrs["class"] == "language-python"
    assert [cell.all_text() for cell in tree.find("th")] == ["step", "minutes"]
    assert [cell.all_text() for cell in tree.find("td")] == ["fry", "2"]
    assert "<p>- flour" not in page and "<p>1." not in page  # the old renderer's paragraphs


def test_ordered_lists_keep_their_source_numbers():
    _, tree = page_of([AnswerUnit(text=f"{n}. Step {n}.", kind="item") for n in (3, 4, 7)])
    (steps,) = tree.find("ol")
    assert steps.attrs["start"] == "3"
    assert [li.attrs.get("value") for li in steps.children] == [None, None, "7"]  # 3, 4, then 7 (not 5)


def test_a_figure_between_list_items_splits_the_list_and_numbering_goes_on():
    units = [AnswerUnit(text=f"{n}. Step {n}.", kind="item") for n in (1, 2, 3)]
    page, tree = page_of(units, (FRYING.source_name, 2))
    assert body_tags(tree) == ["h1", "ol", "figure", "ol"]
    first, second = tree.find("ol")
    assert [li.all_text() for li in first.children] == ["Step 1.", "Step 2."] and "start" not in first.attrs
    assert [li.all_text() for li in second.children] == ["Step 3."] and second.attrs["start"] == "3"
    (figure,) = tree.find("figure")
    assert not {"ol", "ul", "li", "p"} & set(figure.ancestors())
    for li in tree.find("li"):
        assert li.parent.tag in ("ol", "ul")

    bullets = [AnswerUnit(text=text, kind="item") for text in ("- flour", "- eggs")]
    _, tree = page_of(bullets, (FRYING.source_name, 1))
    assert body_tags(tree) == ["h1", "ul", "figure", "ul"]

    markdown = to_markdown(interleave(units, plan((FRYING.source_name, 2)), [FRYING]))
    assert markdown == "1. Step 1.\n2. Step 2.\n\n![Pancake frying in a pan](images/frying.png)\n\n3. Step 3.\n"


def test_the_figure_embeds_the_image_with_its_caption_and_a_missing_one_is_a_placeholder():
    gone = candidate("images/gone.png", "A stack")
    units = [AnswerUnit(text="Fry.")]
    blocks = interleave(units, plan((FRYING.source_name, 1), (gone.source_name, 1)), [FRYING, gone])
    page, warnings = to_html("How?", blocks, [FRYING, gone], STORE)
    tree = Tree(page)
    (img,) = tree.find("img")
    assert img.attrs["src"].startswith("data:image/png;base64,")
    assert img.attrs["alt"] == "Pancake frying in a pan" and img.attrs["data-source-name"] == "images/frying.png"
    assert [f.all_text() for f in tree.find("figcaption")] == ["Pancake frying in a pan", "A stack"]
    missing = [f for f in tree.find("figure") if f.attrs.get("class") == "missing"]
    assert [f.all_text() for f in missing] == ["[image images/gone.png unavailable]A stack"]
    assert warnings == ["image images/gone.png is missing from storage (objects/images/gone.png)"]


@pytest.mark.parametrize("where", ["text", "caption"])
def test_hostile_html_in_a_text_or_a_caption_shows_as_text(where):
    hostile = candidate("images/frying.png", HOSTILE if where == "caption" else "Frying")
    units = [AnswerUnit(text=f"Heat the pan. {HOSTILE} AT&T `a < b`" if where == "text" else "Heat the pan.")]
    page, tree = page_of(units, (hostile.source_name, 1), candidates=[hostile])
    assert "<script" not in page.lower()
    # in a tag, outside its quoted attribute values (an alt text may hold the words, escaped)
    assert not re.search(r"<[^>]*onerror=", re.sub(r'"[^"]*"', '""', page))
    assert tree.find("script") == []
    assert [a for e in tree.elements for a in e.attrs if a.lower().startswith("on")] == []
    assert len(tree.find("img")) == 1  # the figure's own image, and no other
    if where == "text":
        (paragraph,) = tree.find("p")
        assert paragraph.all_text().startswith(f"Heat the pan. {HOSTILE} AT&T")  # the characters as written
        assert tree.find("code")[0].all_text() == "a < b"
    else:
        (img,) = tree.find("img")
        assert img.attrs["alt"] == HOSTILE
        assert tree.find("figcaption")[0].all_text() == HOSTILE
    assert "&amp;lt;" not in page and "&amp;amp;" not in page  # escaped once, not twice


def test_links_to_scripts_data_and_files_get_no_href():
    targets = ["javascript:alert(1)", "JavaScript:alert(2)", "java%0Ascript:alert(3)", "&#106;avascript:alert(4)"]
    targets += ["vbscript:msgbox(5)", "data:text/html,<b>6</b>", "file:///etc/passwd"]
    text = " ".join(f"[bad{n}]({target})" for n, target in enumerate(targets))
    text += " <javascript:alert(7)> ![pic](data:image/svg+xml,x)"
    text += " [web](https://example.org) [mail](mailto:a@example.org) [near](notes/fry.html) [top](#tips)"
    _, tree = page_of([AnswerUnit(text=text), AnswerUnit(text="[ref]: javascript:alert(8)\n\nSee [ref].")])
    links = [a.attrs.get("href") for a in tree.find("a")]
    assert links == ["https://example.org", "mailto:a@example.org", "notes/fry.html", "#tips"]
    assert tree.find("img") == []  # the data: image stayed text
    for element in tree.elements:
        for name, value in element.attrs.items():
            cleaned = "".join(ch for ch in (value or "") if ch > " ").lower()
            assert not re.match(r"(javascript|vbscript|data|file):", cleaned), (element.tag, name, value)


def test_blocks_carry_their_kind_and_headings_their_level():
    units = [
        AnswerUnit(text="Pancakes", kind="heading", level=1),
        AnswerUnit(text="They are thin."),
        AnswerUnit(text="They are round."),
        AnswerUnit(text="Directions", kind="heading", level=3),
        AnswerUnit(text="1. Mix.", kind="item"),
        AnswerUnit(text="2. Fry.", kind="item"),
        AnswerUnit(text="```\nfry()\n```", kind="code"),
        AnswerUnit(text="| a |\n| - |\n| 1 |", kind="table"),
        AnswerUnit(text="#### Serving", kind="heading"),  # an LM's heading, written as Markdown, no level
    ]
    merged, _ = merge("How?", units, plan((FRYING.source_name, 5)), [FRYING], STORE)
    blocks = merged.model_dump(mode="json")["blocks"]
    assert [(b["type"], b["kind"], b["level"]) for b in blocks] == [
        ("text", "heading", 2),
        ("text", "paragraph", None),
        ("text", "heading", 3),
        ("text", "item", None),
        ("image", None, None),
        ("text", "item", None),
        ("text", "code", None),
        ("text", "table", None),
        ("text", "heading", 4),
    ]
    assert [b["text"] for b in blocks if b["kind"] in ("heading", "paragraph")] == [
        "## Pancakes",
        "They are thin. They are round.",
        "### Directions",
        "#### Serving",
    ]
    assert merged.markdown.startswith("## Pancakes\n\nThey are thin. They are round.\n\n### Directions\n\n1. Mix.\n\n!")


def test_only_sentences_next_to_each_other_in_their_source_make_one_paragraph():
    def sentence(text: str, document: int | None, position: int | None = None) -> AnswerUnit:
        source = (
            None if document is None else UnitSource(document_id=document, doc_key=f"d{document}", position=position)
        )
        return AnswerUnit(text=text, source=source)

    units = [
        sentence("A4.", 1, 4),
        sentence("A5.", 1, 5),
        sentence("A7.", 1, 7),  # a gap in document 1
        sentence("B8.", 2, 8),  # the next position, but of another document
        sentence("B9.", 2, 9),
        sentence("Written.", None),  # an LM's sentence: no source
        sentence("Also written.", None),
        sentence("A8.", 1, 8),
    ]
    blocks = interleave(units, plan(), [])
    assert [(b.kind, b.text) for b in blocks] == [
        ("paragraph", "A4. A5."),
        ("paragraph", "A7."),
        ("paragraph", "B8. B9."),
        ("paragraph", "Written. Also written."),
        ("paragraph", "A8."),
    ]
    _, tree = page_of(units)
    assert [p.all_text() for p in tree.find("p")] == ["A4. A5.", "A7.", "B8. B9.", "Written. Also written.", "A8."]


def test_markdown_keeps_a_list_together_and_reads_answers_stored_without_kinds():
    units = [
        AnswerUnit(text="Mix it all."),
        AnswerUnit(text="1. Mix.", kind="item"),
        AnswerUnit(text="    - flour <b>", kind="item"),
        AnswerUnit(text="2. Fry.", kind="item"),
    ]
    assert to_markdown(interleave(units, plan(), [])) == "Mix it all.\n\n1. Mix.\n   - flour &lt;b>\n2. Fry.\n"
    stored = [AnswerBlock(type="text", text="Intro."), *[AnswerBlock(type="text", text=f"{n}. Step.") for n in (1, 2)]]
    assert to_markdown(stored) == "Intro.\n\n1. Step.\n2. Step.\n"
    page, _ = to_html("How?", stored, [], None)
    tree = Tree(page)
    assert tree.errors == [] and body_tags(tree) == ["h1", "p", "ol"] and len(tree.find("li")) == 2
