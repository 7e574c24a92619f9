"""Every ```python block of the README runs (8 simulated devices)."""

import re

import jax
import pytest

from tests.test_multihost import ROOT

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index):
    # README code is user code: standard dtype promotion, not the suite's strict.
    with jax.numpy_dtype_promotion("standard"):
        exec(compile(BLOCKS[index], f"README block {index}", "exec"), {})


def test_readme_has_examples():
    assert len(BLOCKS) >= 5
