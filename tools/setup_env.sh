#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment on a CPU-only machine.
#
# Idempotent: the environment is rebuilt only when this script or setup.cfg changed
# since the last successful run (a stamp file stores their hash), so a second run
# returns in well under a second.
#
# detectron2 route (see ../shared/docs/ENVIRONMENT.md):
#   1. upstream git at the pinned commit, when GitHub answers within a few seconds;
#   2. otherwise PyPI's sal-detectron2==0.7.2 (same sources), whose only wheel is
#      tagged cp310: it is downloaded for 3.10 and installed renamed to a py3 tag.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
D2_COMMIT="a59f0563"
D2_GIT="https://github.com/facebookresearch/detectron2.git"
D2_PYPI="sal-detectron2==0.7.2"
STAMP="$VENV/.acamkd-setup-stamp"

want="$(cat "$ROOT/tools/setup_env.sh" "$ROOT/setup.cfg" | sha256sum | cut -d' ' -f1)"
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
pip_quiet install -q --upgrade "pip>=24" "setuptools<80" wheel

echo "[setup] torch + torchvision"
pip_quiet install -q "torch==2.14.1" "torchvision==0.29.1"

if "$VENV/bin/python" -c "import detectron2" 2>/dev/null; then
  echo "[setup] detectron2 already installed"
elif timeout 10 git ls-remote --exit-code "$D2_GIT" HEAD >/dev/null 2>&1; then
  echo "[setup] detectron2 from upstream git at $D2_COMMIT"
  pip_quiet install -q --no-build-isolation "git+$D2_GIT@$D2_COMMIT"
else
  echo "[setup] GitHub unreachable: detectron2 from PyPI ($D2_PYPI, same sources)"
  tmp="$(mktemp -d)"
  pip_quiet download -q --no-deps --only-binary=:all: --python-version 3.10 \
    -d "$tmp" "$D2_PYPI"
  whl="$(ls "$tmp"/sal_detectron2-*.whl)"
  fixed="$tmp/sal_detectron2-0.7.2-py3-none-any.whl"
  mv "$whl" "$fixed"
  pip_quiet install -q "$fixed"
  rm -rf "$tmp"
fi

echo "[setup] project (editable) and its pinned dependencies"
pip_quiet install -q -e "$ROOT[dev]"

echo "$want" >"$STAMP"
echo "[setup] done in $(( $(date +%s) - start )) s"
