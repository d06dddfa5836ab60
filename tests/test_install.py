"""
``pip install -e .`` into a user's own detectron2 environment changes none of its packages.

The user's environment is built cheaply from this project's own ``.venv``: a fresh virtual
environment whose ``.pth`` file adds a folder of links to the installed files of detectron2,
torch, torchvision, OpenCV, setuptools and everything they require (their dependency closure
read from the installed metadata). No wheel is copied or downloaded for it (torch alone is
5.5 GB), and pip treats that folder as lying outside the environment, so a failing install could
never remove anything from ``.venv``. The install itself is the user's command, without this
project's constraints.txt: pip resolves the missing requirements (timm, cityscapesscripts, ...)
from the package index, as it would for a user, and any range in setup.cfg that excluded an
installed version would make pip install another version into the environment, which the test
sees.
"""

import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, FrozenSet, List

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]

# What a detectron2 user has installed before meeting this project. Upstream detectron2 requires
# fvcore and iopath; PyPI's sal-detectron2 (this project's fallback route) does not declare them,
# so they are added by hand to make the environment one in which detectron2 works.
_USER_ROOTS = ("torch", "torchvision", "opencv-python-headless", "setuptools", "fvcore", "iopath")
_D2_DISTRIBUTIONS = ("detectron2", "sal-detectron2")

# Prints {distribution: version} as the interpreter that runs it resolves them (first on sys.path),
# leaving out the copies a package vendors (setuptools >= 71 puts its _vendor folder, with e.g.
# typing_extensions 4.12.2, on sys.path): they are not installed distributions.
_VERSIONS = """
import importlib.metadata as m, json
out = {}
for d in m.distributions():
    if "_vendor" not in str(getattr(d, "_path", "")):
        out.setdefault(d.metadata["Name"].lower().replace("_", "-"), d.version)
print(json.dumps(out))
"""


def _installed() -> Dict[str, metadata.Distribution]:
    """This interpreter's installed distributions, the first on sys.path of each name, without
    vendored copies (importing setuptools >= 71, as earlier tests do, appends its _vendor
    folder to sys.path, with e.g. typing_extensions 4.12.2)."""
    found: Dict[str, metadata.Distribution] = {}
    for d in metadata.distributions():
        if "_vendor" not in str(getattr(d, "_path", "")):
            found.setdefault(canonicalize_name(d.metadata["Name"]), d)
    return found


def _closure(roots: List[str], installed: Dict[str, metadata.Distribution]) -> List[str]:
    """The installed distributions that ``roots`` need, following extras and markers."""
    extras_of: Dict[str, FrozenSet[str]] = {}
    todo = [(canonicalize_name(r), frozenset()) for r in roots]
    while todo:
        name, extras = todo.pop()
        if name not in installed or (name in extras_of and extras <= extras_of[name]):
            continue
        extras_of[name] = extras_of.get(name, frozenset()) | extras
        for line in installed[name].requires or []:
            req = Requirement(line)
            active = ("",) + tuple(extras_of[name])
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in active):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return sorted(extras_of)


def _link_user_environment(folder: Path) -> List[str]:
    """Links in ``folder`` to the files of detectron2's world; returns the distributions."""
    installed = _installed()
    d2 = [n for n in _D2_DISTRIBUTIONS if n in installed]
    assert d2, "no detectron2 distribution in the project environment"
    names = _closure(d2 + list(_USER_ROOTS), installed)
    folder.mkdir()
    for name in names:
        dist = installed[name]
        base = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or []}:
            # .pth files are processed only in site directories; "..": scripts under bin/
            if top.endswith(".pth") or top in ("..", "__pycache__"):
                continue
            if (base / top).exists() and not (folder / top).exists():
                (folder / top).symlink_to(base / top)
    return names


def _versions(python: Path) -> Dict[str, str]:
    out = subprocess.run([str(python), "-c", _VERSIONS], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs the project's virtual environment")
def test_install_into_a_detectron2_environment_changes_no_installed_version(tmp_path: Path) -> None:
    user_names = _link_user_environment(tmp_path / "user_site")
    env_dir = tmp_path / "user_env"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "detectron2_world.pth").write_text(str(tmp_path / "user_site") + "\n")

    check = "import detectron2.engine, torch, cv2; print(torch.__version__)"
    proc = subprocess.run([str(python), "-c", check], capture_output=True, text=True)
    assert proc.returncode == 0, f"the user environment is not a detectron2 one:\n{proc.stderr}"
    before = _versions(python)
    assert "acamkd" not in before
    assert {"torch", "torchvision"} <= set(before) and set(_D2_DISTRIBUTIONS) & set(before)
    assert {"timm", "cityscapesscripts"}.isdisjoint(user_names)

    # The user's command; this interpreter's pip drives the new environment (it has none).
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-e", str(REPO)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"),
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    # pip may offer to replace a vendored copy (see _VERSIONS); replacing one of the user's
    # installed distributions is what must never happen.
    replaced = re.findall(r"Found existing installation: (\S+) (\S+)", install.stdout)
    user_owned = [(n, v) for n, v in replaced if before.get(canonicalize_name(n)) == v]
    assert user_owned == [], install.stdout[-3000:]
    after = _versions(python)

    changed = {n: (v, after.get(n)) for n, v in before.items() if after.get(n) != v}
    assert changed == {}, f"pip install -e . changed installed versions: {changed}"
    assert after["acamkd"] == "0.1.0"
    for new in ("timm", "cityscapesscripts"):  # acamkd's own requirements were installed
        assert new in after and new not in before

    proc = subprocess.run(
        [str(python), "-c", "import acamkd; print(acamkd.__file__)"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()).resolve() == REPO / "projects/ACAMKD/acamkd/__init__.py"
