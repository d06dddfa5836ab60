"""Environment report: detectron2's own table plus where this project's stack came from.

Run it as ``python -m acamkd.training.env`` (or ``make env``) and paste the output into bug reports.

detectron2 reaches this project by one of two routes (see ``tools/setup_env.sh``): the upstream
git install pinned to commit ``a59f0563``, or, where GitHub is unreachable, PyPI's
``sal-detectron2==0.7.2`` wheel, which carries the same sources but a compiled ``_C`` extension
built for CPython 3.10 that Python 3.11 never loads. The project section says which route was
taken and what is missing without ``_C``, because both change what a user can run.

Every probe here is guarded: a report that crashes on an odd set-up is useless exactly when it
is needed, so failures are shown as ``<error: ...>`` lines instead.
"""

import glob
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

__all__ = [
    "UPSTREAM_COMMIT",
    "collect_acamkd_env",
    "describe_detectron2_distribution",
    "detectron2_c_status",
    "format_env_report",
    "has_compiled_ops",
    "main",
]

# The upstream detectron2 commit this project pins: the one place in Python code.
# tools/setup_env.sh installs it as D2_COMMIT (tests/test_stack.py keeps the two equal).
UPSTREAM_COMMIT = "a59f0563"
# The sal-detectron2 release that was compared file by file with UPSTREAM_COMMIT; other
# releases of that package are reported without the "same sources" claim.
_SAL_VERIFIED_VERSION = "0.7.2"
# Distribution names that can provide the ``detectron2`` import package, in lookup order.
_D2_DISTRIBUTIONS = ("detectron2", "sal-detectron2")
# What a user loses when ``detectron2._C`` cannot be imported.
_WITHOUT_C = (
    "no deformable conv, no rotated boxes / ROIAlignRotated, no C++ fast COCOeval "
    "(use COCOEvaluator(..., use_fast_impl=False))"
)


def _error_text(e: BaseException) -> str:
    """One line naming an exception, for report values."""
    return f"<error: {type(e).__name__}: {e}>"


def _safe(fn: Callable[[], str]) -> str:
    """Return ``fn()``, or a one-line description of the exception it raised."""
    try:
        return fn()
    except Exception as e:  # a report must survive any single failing probe
        return _error_text(e)


def _direct_url(dist: importlib.metadata.Distribution) -> Optional[Dict]:
    """The PEP 610 ``direct_url.json`` of ``dist`` (how pip got it), or None."""
    text = dist.read_text("direct_url.json")
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def describe_detectron2_distribution(
    name: str, version: str, direct_url: Optional[Dict] = None
) -> str:
    """Describe where an installed detectron2 distribution came from.

    Args:
        name (str): distribution name, "detectron2" (upstream) or "sal-detectron2" (PyPI).
        version (str): its version from the distribution metadata.
        direct_url (dict or None): its PEP 610 ``direct_url.json``, if pip wrote one.

    Returns:
        str: one line such as "upstream git https://... @ a59f0563... (the pinned commit)" or
        "PyPI wheel sal-detectron2==0.7.2 (same sources as upstream a59f0563)".
    """
    direct_url = direct_url or {}
    url = direct_url.get("url", "")
    vcs_info = direct_url.get("vcs_info")
    if vcs_info:
        commit = vcs_info.get("commit_id", "")
        pinned = (
            "the pinned commit"
            if commit.startswith(UPSTREAM_COMMIT)
            else f"not the pinned {UPSTREAM_COMMIT}"
        )
        return f"{name} {version}: {vcs_info.get('vcs', 'vcs')} {url} @ {commit} ({pinned})"
    if direct_url.get("dir_info") is not None:
        editable = " (editable)" if direct_url["dir_info"].get("editable") else ""
        return f"{name} {version}: local source {url}{editable}"
    if name == "sal-detectron2":
        # The wheel is installed from a renamed local file, so its URL says nothing useful.
        if version == _SAL_VERIFIED_VERSION:
            return (
                f"PyPI wheel sal-detectron2=={version} "
                f"(same sources as upstream {UPSTREAM_COMMIT})"
            )
        return (
            f"PyPI wheel sal-detectron2=={version} "
            f"(not the verified {_SAL_VERIFIED_VERSION}; sources unchecked)"
        )
    origin = f" from {url}" if url else ""
    return f"{name} {version}{origin}"


def _detectron2_source() -> str:
    """Which installed distribution provides the ``detectron2`` package, and from where."""
    # packages_distributions() reads every installed RECORD, so it names the distribution
    # that really owns the import package even when both names are installed.
    owners = importlib.metadata.packages_distributions().get("detectron2", [])
    candidates = list(dict.fromkeys([*owners, *_D2_DISTRIBUTIONS]))
    for name in candidates:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return describe_detectron2_distribution(
            dist.metadata["Name"] or name, dist.version, _direct_url(dist)
        )
    # No metadata: a source checkout on sys.path / PYTHONPATH.
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.origin:
        return "not installed"
    return f"no distribution metadata (found at {os.path.dirname(spec.origin)})"


def detectron2_c_status() -> Tuple[str, bool]:
    """Whether ``detectron2._C`` imports: the project's one probe of the compiled extension.

    Returns:
        tuple[str, bool]: a one-line status and whether the extension is available.
    """
    try:
        from detectron2 import _C  # noqa: F401
    except Exception as e:
        # A compiled file that is present but not loadable (the cp310 wheel on 3.11) is a
        # different fix from a missing build, so name it instead of the generic ImportError.
        import detectron2

        found = sorted(
            os.path.basename(p)
            for p in glob.glob(os.path.join(os.path.dirname(detectron2.__file__), "_C*"))
        )
        if found:
            wanted = "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]
            return f"unavailable: {', '.join(found)} is not loadable here (wants {wanted})", False
        return f"unavailable ({type(e).__name__}: {e})", False
    return "available", True


def has_compiled_ops() -> bool:
    """Whether detectron2's compiled ``_C`` extension loads (not with the PyPI wheel on 3.11)."""
    return detectron2_c_status()[1]


def _torch_cuda() -> List[Tuple[str, str]]:
    """Rows describing torch's CUDA build and the visible devices."""
    import torch

    rows = [
        ("torch", torch.__version__),
        ("torch CUDA build", torch.version.cuda or "none (CPU-only build)"),
    ]
    available = torch.cuda.is_available()
    rows.append(("CUDA available", str(available)))
    count = torch.cuda.device_count()
    devices = str(count)
    if count:
        names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
        devices += f" ({', '.join(names)})"
    rows.append(("CUDA devices", devices))
    return rows


def _acamkd_version() -> str:
    """The installed version of this project, with how it was installed."""
    dist = importlib.metadata.distribution("acamkd")
    direct_url = _direct_url(dist) or {}
    editable = (direct_url.get("dir_info") or {}).get("editable")
    return dist.version + (" (editable install)" if editable else "")


def collect_acamkd_env() -> List[Tuple[str, str]]:
    """Collect the project section of the environment report.

    Returns:
        list[tuple[str, str]]: (name, value) rows: "detectron2 source", "detectron2._C" (and,
        when it is unavailable, "without detectron2._C"), "torch", "torch CUDA build",
        "CUDA available", "CUDA devices", "acamkd", "acamkd path". A probe that fails shows
        ``<error: ...>`` as its value; this function itself does not raise.
    """
    rows = [("detectron2 source", _safe(_detectron2_source))]
    try:
        c_status, has_c = detectron2_c_status()
        rows.append(("detectron2._C", c_status))
        if not has_c:
            rows.append(("without detectron2._C", _WITHOUT_C))
    except Exception as e:
        rows.append(("detectron2._C", _error_text(e)))
    try:
        rows.extend(_torch_cuda())
    except Exception as e:
        rows.append(("torch", _error_text(e)))
    rows.append(("acamkd", _safe(_acamkd_version)))
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # acamkd/training/..
    rows.append(("acamkd path", package))
    return rows


def _format_rows(rows: List[Tuple[str, str]]) -> str:
    """Lay out rows as a two-column table like detectron2's."""
    try:
        from tabulate import tabulate

        return tabulate(rows)
    except Exception:  # tabulate comes with detectron2; keep a plain layout without it
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def format_env_report() -> str:
    """Build the full report: detectron2's ``collect_env_info()`` table, then the project's.

    Returns:
        str: the report text. If detectron2's collector raises (it probes compilers, CUDA
        and optional packages), its part is replaced by one error line.
    """
    try:
        from detectron2.utils import collect_env as d2_collect_env

        d2_part = d2_collect_env.collect_env_info()
    except Exception as e:
        d2_part = "detectron2.utils.collect_env.collect_env_info() failed: " + _error_text(e)
    project_part = _format_rows(collect_acamkd_env())
    return f"{d2_part.rstrip()}\n\nACAM-KD project\n{project_part}\n"


def main() -> None:
    """Print the environment report to stdout."""
    sys.stdout.write(format_env_report())


if __name__ == "__main__":
    main()
