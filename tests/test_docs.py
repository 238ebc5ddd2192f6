"""The docstrings cite the maths in docs/: every cited page and section exists."""

from __future__ import annotations

import builtins
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"docs/([\w/]+\.md)((?:[ ,]*§\d+(?:-§\d+)?)*)")


def sections(page: Path) -> set[int]:
    return {int(m) for m in re.findall(r"^## (\d+)\.", page.read_text(), re.M)}


def test_every_citation_in_the_code_points_to_an_existing_section() -> None:
    cited = 0
    for path in sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "tests").glob("*.py")):
        for match in CITATION.finditer(path.read_text()):
            page = ROOT / "docs" / match.group(1)
            assert page.exists(), f"{path.name} cites missing {page}"
            numbers = [int(n) for n in re.findall(r"§(\d+)", match.group(2))]
            missing = [n for n in numbers if n not in sections(page)]
            assert not missing, f"{path.name} cites {page.name} §{missing}, which it lacks"
            cited += 1
    assert cited > 40  # the docstrings do cite the docs


def test_no_citation_of_a_file_outside_the_repository() -> None:
    for path in sorted((ROOT / "src").rglob("*.py")):
        assert "methods.md" not in path.read_text().replace("docs/methods/", ""), path


PAGES = {
    name: name for name in ("exact", "dual", "cg", "lissa", "arnoldi", "datainf", "unrolled")
} | {
    "kfac": "kfac",
    "ekfac": "kfac",
    "astra": "astra",
    "identity": "identity",
    "trak": "trak",
    "source": "unrolled",
}


def test_every_built_in_method_has_a_page_whose_options_table_is_its_options() -> None:
    import infkit
    from infkit.kfac.curvature import KRONECKER_FIELDS
    from infkit.methods import method_class

    assert set(PAGES) <= set(infkit.methods())
    for name, page in PAGES.items():
        text = (ROOT / "docs" / "methods" / f"{page}.md").read_text()
        rows = re.findall(r"^\| `(\w+)` \|", text, re.M)
        expected = set(method_class(name).Options.names())
        if name in ("astra", "source"):  # their tables point to the kfac page's EK-FAC options
            expected -= set(KRONECKER_FIELDS)
        assert set(rows) >= expected, f"{page}.md lacks options {sorted(expected - set(rows))}"
        sharing = [other for other, shared in PAGES.items() if shared == page]
        known = set().union(*(method_class(other).Options.names() for other in sharing))
        stale = set(rows) - known
        assert not stale, f"{page}.md documents options {sorted(stale)} that {sharing} lack"


def test_every_name_the_readme_gives_is_reached_from_import_infkit() -> None:
    """A tester's: ``infkit.valuation.kairos``, ``infkit.analyses.poisoning``, ``infkit.plot``
    and ``infkit.ArtifactError``, as the README writes them, were AttributeErrors after
    ``import infkit``: the submodules are imported when first read, the errors exported."""
    import infkit

    text = (ROOT / "README.md").read_text()
    names = set(re.findall(r"(?<![\w./])(infkit(?:\.[A-Za-z_]\w*)+)", text)) - {"infkit.toml"}
    errors = set(re.findall(r"`(\w*(?:Error|Notice|Warning))`", text)) - set(dir(builtins))
    names |= {f"infkit.{e}" for e in errors}
    assert {"infkit.valuation.kairos", "infkit.analyses.poisoning", "infkit.Notice"} <= names
    for name in sorted(names):
        found: object = infkit
        for part in name.split(".")[1:]:
            assert hasattr(found, part), f"the README's {name}: no {part!r}"
            found = getattr(found, part)
    with pytest.raises(AttributeError, match="has no attribute 'nosuch'"):
        infkit.analyses.nosuch  # noqa: B018


def _resolves(name: str) -> bool:
    """Whether the dotted ``infkit...`` name is a module or an attribute path, importing
    submodules on the way (``infkit.methods.arnoldi``, where ``infkit.methods`` is also a
    function) as the API pages' references do."""
    import importlib

    parts = name.split(".")
    found: object = importlib.import_module(parts[0])
    for k in range(2, len(parts) + 1):
        try:
            found = importlib.import_module(".".join(parts[:k]))
            continue
        except ImportError:
            pass
        if not hasattr(found, parts[k - 1]):
            return False
        found = getattr(found, parts[k - 1])
    return True


def test_every_name_the_docs_give_is_reached_and_every_code_block_closes() -> None:
    """A tester's: docs/distributed.md named ``analyses.dataset_embedding`` (it is
    ``analyses.similarity.dataset_embedding``), and a closing fence with text after it on
    docs/methods/identity.md made the rest of the block a paragraph, which the strict docs
    build passes. Every ``infkit.`` name, and every name under a submodule written without
    the prefix (``analyses.x.y``, ``retrain.x``), resolves; every closing fence is bare."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    prefixes = "analyses|retrain|evaluate|plot|valuation|language_modeling|distributed"
    checked = 0
    for page in pages:
        text = page.read_text()
        names = set(re.findall(r"(?<![\w./-])(infkit(?:\.[A-Za-z_]\w*)+)", text)) - {"infkit.toml"}
        names |= {f"infkit.{m}" for m in re.findall(rf"`((?:{prefixes})(?:\.[A-Za-z_]\w*)+)", text)}
        for name in sorted(names):
            assert _resolves(name), f"{page.relative_to(ROOT)} names {name}, which does not exist"
            checked += 1
        inside = False
        for number, line in enumerate(text.splitlines(), start=1):
            fence = line.strip()
            if fence.startswith("```"):
                assert not inside or fence == "```", (
                    f"{page.relative_to(ROOT)}:{number}: text after a closing fence"
                )
                inside = not inside
        assert not inside, f"{page.relative_to(ROOT)}: a code block never closes"
    assert checked > 100
