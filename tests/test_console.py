"""The entry points print no warning a user cannot act on, and silence nothing else."""

import os
import subprocess
import sys

import pytest

from tiny_models import REPO


@pytest.mark.parametrize("entry", ["train_net.py", "tools/demo.py", "tools/study.py"])
def test_entry_point_starts_without_dependency_warnings(entry):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run(
        [sys.executable, entry, "--help"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr


def test_only_the_dependencies_warnings_are_silenced(tmp_path):
    code = (
        "import runpy, sys, warnings\n"
        "sys.argv = ['train_net.py', '--help']\n"
        "try:\n"
        "    runpy.run_path('train_net.py', run_name='not_main')\n"
        "except SystemExit:\n"
        "    pass\n"
        "warnings.warn('still shown', FutureWarning)\n"
        "import torch\n"
        "def plus_one(x: torch.Tensor) -> torch.Tensor:\n"
        "    return x + 1\n"
        "torch.jit.script(plus_one)\n"  # silenced: raised in torch.jit._script
        "from detectron2.modeling.anchor_generator import _create_grid_offsets\n"
        "_create_grid_offsets((4, 4), 8, 0.0, torch.zeros(1))\n"  # meshgrid: silenced
    )
    script = tmp_path / "check_filters.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "FutureWarning: still shown" in done.stderr
    assert "torch.jit.script` is deprecated" not in done.stderr
    assert "torch.meshgrid" not in done.stderr
