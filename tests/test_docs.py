"""The documentation a newcomer meets holds together: every link in README.md and docs/ reaches a file of the
repository (and a heading, where it names one), nothing points outside the repository, every method has its page,
every message that names a troubleshooting entry names one that exists, and every value of every config has its
source in docs/recipes.md."""
import re

import pytest
import yaml

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


def recipe_sections():
    """docs/recipes.md's section of each config: its name -> {key: value as the table gives it}."""
    text = (REPO / "docs" / "recipes.md").read_text()
    sections = {}
    for part in re.split(r"(?m)^## configs/", text)[1:]:
        name, _, body = part.partition(".yaml\n")
        rows = re.findall(r"^\| (\w+) \| (.*?) \| .*\S.* \|$", body, flags=re.M)
        sections[name] = {key: value for key, value in rows if key != "key"}
    return sections


@pytest.mark.quick
@pytest.mark.parametrize("config", sorted(p.stem for p in (REPO / "configs").glob("*.yaml")))
def test_every_config_value_is_sourced_in_docs_recipes(config):
    """Every key of the config has its row in docs/recipes.md (value and source), with the config's value; the
    config's header points at its section."""
    path = REPO / "configs" / f"{config}.yaml"
    values = yaml.safe_load(path.read_text())
    rows = recipe_sections().get(config)
    assert rows is not None, f"docs/recipes.md has no section configs/{config}.yaml"
    assert set(values) - set(rows) == set(), f"keys of {config}.yaml without a source in docs/recipes.md"
    for key, value in values.items():
        assert yaml.safe_load(rows[key]) == value, f"{config}.yaml {key}: {value!r}, docs/recipes.md: {rows[key]!r}"
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert f"docs/recipes.md, section configs/{config}.yaml" in header
