"""The README reads true: it is one page, its quickstart is two commands,
every ```python block runs as a user would run it (a fresh process, default
devices, no flags from this test suite), and its links name files that exist.
The guides in docs/ are checked the same way by tests/test_docs.py."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_multihost import ROOT

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def run_block(code: str, cwd: Path, what: str) -> None:
    """Runs ``code`` as ``python -c`` in ``cwd`` with the user's environment:
    the test suite's simulated devices and platform are left out."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")
    }
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"{what} failed:\n{run.stderr[-3000:]}"


def relative_links(text: str) -> list[str]:
    """Targets of the Markdown links that are not URLs, without anchors."""
    targets = re.findall(r"\]\(((?!https?://|#)[^)#\s]+)", text)
    return [t for t in targets if not t.startswith("mailto:")]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_in_a_fresh_process(index, tmp_path):
    run_block(BLOCKS[index], tmp_path, f"README block {index}")


def test_readme_is_one_page_with_a_two_command_quickstart():
    assert len(README.splitlines()) <= 200, "the README is one page: move it to docs/"
    assert len(BLOCKS) >= 2
    quick = re.search(r"## Quickstart.*?```bash\n(.*?)```", README, re.S).group(1)
    commands = [
        line for line in quick.splitlines() if line.strip() and not line.startswith("#")
    ]
    assert len(commands) == 2, commands
    assert "reproduce --quick" in commands[0] and "pytest" in commands[1]


def test_readme_quotes_no_generated_numbers():
    # Generated sections live in docs/reproduction.md, so that re-running an
    # experiment never rewrites the README.
    assert "<!--" not in README


def test_readme_links_to_files_in_the_repository():
    links = relative_links(README)
    assert links
    for target in links:
        assert (ROOT / target).exists(), f"README links to a missing file: {target}"
