"""The documentation a newcomer meets holds together: every link in README.md and docs/ reaches a file of the
repository (and a heading, where it names one), nothing points outside the repository, every method has its page,
and every message that names a troubleshooting entry names one that exists."""
import re

import pytest

from helpers import METHODS, REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def anchors(path):
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def links(path):
    """The relative targets of a markdown file's links and images, without web addresses."""
    targets = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
    return [t for t in targets if not re.match(r"[a-z]+:", t)]


@pytest.mark.quick
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_reach_files_and_headings_of_the_repository(page):
    text = page.read_text()
    assert "../shared" not in text and "methods.md" not in text.replace("docs/methods/", ""), \
        f"{page.name} points outside the repository"
    for target in links(page):
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        assert resolved.exists() and REPO in resolved.parents, f"{page.name}: {target} is not in the repository"
        if anchor:
            assert anchor in anchors(resolved), f"{page.name}: {target} names no heading of {resolved.name}"


def test_every_method_has_its_page_linked_from_readme():
    readme = (REPO / "README.md").read_text()
    for method in METHODS:
        page = REPO / "docs" / "methods" / f"{method}.md"
        assert page.exists() and f"(docs/methods/{method}.md)" in readme, method
        assert f"`{method}.py`" in page.read_text() or f"{method}.py" in page.read_text(), method


def test_messages_name_troubleshooting_entries_that_exist():
    """The collapse warnings of SwAV, DINO and SimSiam, and the errors of a non-finite step or a lost rank, name
    their entry of docs/troubleshooting.md."""
    entries = anchors(REPO / "docs" / "troubleshooting.md")
    named = {}
    for path in [*REPO.glob("*.py"), *(REPO / "common").glob("*.py")]:
        for anchor in re.findall(r"docs/troubleshooting\.md#([\w-]+)", path.read_text()):
            named.setdefault(anchor, []).append(path.name)
    assert set(named) <= entries, set(named) - entries
    for script in ("swav.py", "dino.py", "simsiam.py"):
        source = (REPO / script).read_text()
        warning = source[source.index("def collapse_warning"):].split("\n\n\n")[0]
        assert "docs/troubleshooting.md#collapse-in-" in warning, script
    assert {"nan-or-inf", "a-lost-rank", "a-slow-cpu-run"} <= set(named)
