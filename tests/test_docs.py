"""The guides in docs/ read true: every ```python block runs in a fresh
process, every relative link names a file that exists, the generated
sections of docs/reproduction.md are what the committed results give, and
the site (guides and API reference) builds with ``mkdocs build --strict``."""

import importlib
import inspect
import re
import subprocess
import sys

import pytest

from tests.test_multihost import ROOT
from tests.test_readme import python_blocks, relative_links, run_block

DOCS = ROOT / "docs"
GUIDES = sorted(DOCS.rglob("*.md"))
BLOCKS = [
    pytest.param(path, i, id=f"{path.relative_to(DOCS)}-{i}")
    for path in GUIDES
    for i in range(len(python_blocks(path.read_text())))
]
# Each module of the API reference: the page that renders it.
REFERENCE = {
    "bnlab": "core",
    "bnlab.stats": "core",
    "bnlab.linen": "flax",
    "bnlab.nnx": "flax",
    "bnlab.train": "train",
    "bnlab.data": "data",
    "bnlab.models": "models",
    "bnlab.parallel": "parallel",
    "bnlab.collectives": "parallel",
    "bnlab.diagnostics": "diagnostics",
}


@pytest.mark.slow
@pytest.mark.parametrize("path,index", BLOCKS)
def test_guide_python_block_runs_in_a_fresh_process(path, index, tmp_path):
    code = python_blocks(path.read_text())[index]
    run_block(code, tmp_path, f"{path.relative_to(ROOT)} block {index}")


def test_guides_have_examples():
    assert len(BLOCKS) >= 7


@pytest.mark.parametrize("path", GUIDES, ids=lambda p: str(p.relative_to(DOCS)))
def test_guide_links_to_files_that_exist(path):
    for target in relative_links(path.read_text()):
        assert (path.parent / target).exists(), (
            f"{path.relative_to(ROOT)} links to a missing file: {target}"
        )


def test_guide_generated_sections_are_the_committed_results():
    from docs import readme_numbers

    text = readme_numbers.GUIDE.read_text()
    assert readme_numbers.rewrite(text) == text, (
        f"{readme_numbers.GUIDE.relative_to(ROOT)}'s generated sections differ "
        "from the results: run python docs/readme_numbers.py"
    )
    for name in readme_numbers.SECTIONS:
        section = re.search(
            rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", text, re.S
        )
        assert section and section.group(1).strip(), f"no generated {name} section"
    assert "SUPPORTED" in text and "CONTRADICTED" in text


def test_every_guide_is_in_the_site():
    nav = (ROOT / "mkdocs.yml").read_text()
    for path in GUIDES:
        assert str(path.relative_to(DOCS)) in nav, f"{path} is not in mkdocs.yml's nav"


@pytest.mark.slow
def test_site_builds_strict_with_every_public_name(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ids = set()
    for page in set(REFERENCE.values()):
        html = (site / "reference" / page / "index.html").read_text()
        ids |= set(re.findall(r'id="([^"]+)"', html))
    text = "".join(
        (DOCS / "reference" / f"{p}.md").read_text() for p in set(REFERENCE.values())
    )
    for name, page in REFERENCE.items():
        module = importlib.import_module(name)
        for attr in module.__all__:
            obj = getattr(module, attr)
            if inspect.ismodule(obj):
                continue  # bnlab.linen, bnlab.nnx: their own sections
            documented = (
                f"{name}.{attr}" in ids
                or f"bnlab.{attr}" in ids  # re-exported at the top level
                or f"{getattr(obj, '__module__', '')}.{attr}" in ids  # where defined
                or f"`{attr} = " in text  # named in the page's text (constants)
            )
            assert documented, f"{name}.{attr} is missing from reference/{page}.md"
