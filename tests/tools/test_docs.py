"""The docs' links: every relative link and image in README.md and docs/*.md names a file of the repository, and
every anchor a heading of the page it points at (GitHub's heading ids)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)


def _prose(text: str) -> str:
    """The page without its code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(page: Path) -> set[str]:
    """GitHub's ids of the page's headings: lowercased, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    ids = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1)).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids.add(slug if count == 0 else f"{slug}-{count}")
    return ids


def links_of(text: str) -> list[str]:
    """The relative link targets of a page's text (not http:, https:, mailto:)."""
    return [target for target in LINK.findall(_prose(text)) if not re.match(r"[a-z]+:", target)]


def links(page: Path) -> list[str]:
    return links_of(page.read_text())


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(page):
    for target in links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
        assert resolved.exists(), f"{page.name}: {target} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{page.name}: {target}: no heading with id {anchor!r}"


def test_the_docs_name_no_folder_outside_the_repository():
    for page in PAGES:
        text = page.read_text()
        assert "../shared" not in text and "fetch-wheels" not in text, page.name


def test_the_parser_finds_links_and_skips_code():
    assert len(links(ROOT / "README.md")) >= 10
    assert links_of("see [a](x.md) and `[b](y.md)`\n```\n[c](z.md)\n```\n![d](p.png)") == ["x.md", "p.png"]


def test_the_anchor_ids_follow_github():
    assert anchors(ROOT / "docs" / "api.md") >= {
        "building-the-ccuda-extension", "below-the-public-functions-dpo_fastcore", "torchcompile", "label_smoothing",
    }  # fmt: skip
