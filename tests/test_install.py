"""The newcomer's install traps: importing bnlab from the folder that holds a
clone named ``bnlab``."""

import os
import subprocess
import sys

import pytest

import bnlab
from tests.test_multihost import ROOT


@pytest.mark.slow  # a subprocess
def test_import_bnlab_from_the_folder_that_holds_a_clone_named_bnlab(tmp_path):
    # `pip install -e .` puts the checkout on sys.path (a static .pth), so the
    # real package wins over the clone's directory (a namespace candidate).
    if not bnlab.__file__.startswith(str(ROOT)):
        pytest.skip("bnlab is not installed from this checkout")
    pth = [
        p
        for d in sys.path
        if os.path.isdir(d)
        for p in os.listdir(d)
        if p.startswith("__editable__") and "bnlab" in p and p.endswith(".pth")
    ]
    if not pth:
        pytest.skip("bnlab is not an editable install here")
    (tmp_path / "bnlab").symlink_to(ROOT, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    run = subprocess.run(
        [sys.executable, "-c", "import bnlab; print(bnlab.__version__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == bnlab.__version__
