"""The README reads true: every ```python block runs as a user would run it
(a fresh process, default devices, no flags from this test suite), and its
numbers section is exactly what the committed results generate."""

import os
import re
import subprocess
import sys

import pytest

from tests.test_multihost import ROOT

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_in_a_fresh_process(index, tmp_path):
    env = {
        k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")
    }
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run(
        [sys.executable, "-c", BLOCKS[index]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"README block {index} failed:\n{run.stderr[-3000:]}"


def test_readme_has_examples_and_a_two_command_quickstart():
    assert len(BLOCKS) >= 5
    quick = re.search(r"## Quickstart.*?```bash\n(.*?)```", README, re.S).group(1)
    commands = [
        line for line in quick.splitlines() if line.strip() and not line.startswith("#")
    ]
    assert len(commands) == 2, commands
    assert "reproduce --quick" in commands[0] and "pytest" in commands[1]


def test_readme_generated_sections_are_the_committed_results():
    sys.path.insert(0, str(ROOT))
    from docs import readme_numbers

    assert readme_numbers.rewrite(README) == README, (
        "README's generated sections differ from the results: run "
        "python docs/readme_numbers.py"
    )
    quick = re.search(r"<!-- quick:begin -->\n(.*?)<!-- quick:end -->", README, re.S)
    assert "claims PASS" in quick.group(1)


def test_readme_links_to_files_in_the_repository():
    for target in re.findall(r"\]\(((?!https?://)[^)#]+)", README):
        assert (ROOT / target).exists(), f"README links to a missing file: {target}"
