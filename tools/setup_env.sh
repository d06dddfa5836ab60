#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment on a CPU-only machine.
#
# Idempotent: the environment is rebuilt only when this script, setup.cfg or constraints.txt
# changed since the last successful run (a stamp file inside the environment stores their
# hash, so a fresh clone, which has no .venv, always sets up), and a second run returns in
# well under a second.
#
# Every install goes through `-c constraints.txt`: the exact versions the project is tested
# with. setup.cfg itself only states ranges (see there), so that the package also installs
# into an existing detectron2 environment without changing it.
#
# Facts this script relies on (measured on the project's machines: Python 3.11, x86_64):
# - torch==2.14.1 / torchvision==0.29.1 are a matching pair (a CUDA build that also runs on the
#   CPU). An older CPU-only torch wheel cannot be paired with PyPI's torchvision (it fails to
#   import beside it), so the pair is pinned together.
# - detectron2 is not on PyPI under its own name. Route 1: upstream git at the pinned commit,
#   when GitHub answers within a few seconds. Route 2: PyPI's sal-detectron2==0.7.2, which is
#   upstream a59f0563 file for file (apart from its version string, a one-line Python 3.11 fix
#   in data/common.py and one test helper). Its only wheel is mislabelled cp310: it is
#   downloaded for 3.10 and installed renamed to a py3 tag; its compiled _C (built for 3.10) is
#   then never loaded, which costs deformable conv, rotated boxes and the C++ fast COCOeval and
#   nothing this project needs on the CPU (`make env` reports it).
# - detectron2.model_zoo imports pkg_resources, which setuptools 82 removed.
# - OpenCV is a prerequisite of detectron2 that it leaves to the user; here it is
#   opencv-python-headless at the constrained version.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
D2_COMMIT="a59f0563"
D2_GIT="https://github.com/facebookresearch/detectron2.git"
D2_PYPI="sal-detectron2==0.7.2"
STAMP="$VENV/.acamkd-setup-stamp"
CONSTRAINTS="$ROOT/constraints.txt"

want="$(cat "$ROOT/tools/setup_env.sh" "$ROOT/setup.cfg" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi

start=$(date +%s)
echo "[setup] creating environment in $VENV"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# This machine's pip.conf lists local indexes that hold only some packages; pip warns once per
# missing one. The warnings are harmless noise, so they are filtered out of the log.
pip_quiet() {
  local rc=0
  "${PIP[@]}" "$@" > >(grep -v "is ignored: it is neither a file nor a directory" >&2) 2>&1 || rc=$?
  return "$rc"
}
pip_quiet install -q --upgrade "pip>=24"
pip_quiet install -q -c "$CONSTRAINTS" setuptools wheel

echo "[setup] torch + torchvision"
pip_quiet install -q -c "$CONSTRAINTS" torch torchvision

if "$VENV/bin/python" -c "import detectron2" 2>/dev/null; then
  echo "[setup] detectron2 already installed"
elif timeout 10 git ls-remote --exit-code "$D2_GIT" HEAD >/dev/null 2>&1; then
  echo "[setup] detectron2 from upstream git at $D2_COMMIT"
  pip_quiet install -q -c "$CONSTRAINTS" --no-build-isolation "git+$D2_GIT@$D2_COMMIT"
else
  echo "[setup] GitHub unreachable: detectron2 from PyPI ($D2_PYPI, same sources)"
  tmp="$(mktemp -d)"
  pip_quiet download -q --no-deps --only-binary=:all: --python-version 3.10 \
    -d "$tmp" "$D2_PYPI"
  whl="$(ls "$tmp"/sal_detectron2-*.whl)"
  fixed="$tmp/sal_detectron2-0.7.2-py3-none-any.whl"
  mv "$whl" "$fixed"
  pip_quiet install -q -c "$CONSTRAINTS" "$fixed"
  rm -rf "$tmp"
fi

echo "[setup] OpenCV, the project (editable) and its dependencies at the tested versions"
pip_quiet install -q -c "$CONSTRAINTS" opencv-python-headless -e "$ROOT[dev]"

echo "$want" >"$STAMP"
echo "[setup] done in $(( $(date +%s) - start )) s"
