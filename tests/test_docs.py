"""
The repository is self-contained: every relative Markdown link in its ``.md`` files resolves to
a file or folder inside it, and no text file refers to the team's documents outside it.
"""

import os
import re
import subprocess
from typing import Iterator, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Never part of the repository's content (environments, data, outputs, caches).
_SKIP_DIRS = {".git", ".venv", "datasets", "output", "build", "__pycache__", ".pytest_cache"}

# Inline links and images, "[text](target)" / "![alt](target "title")", and reference
# definitions, "[id]: target".
_INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # http:, https:, mailto:, detectron2: ...
# Places outside the repository that its files once pointed at. Written in pieces so that this
# file does not match itself.
_OUTSIDE = re.compile("|".join(re.escape(p) for p in ("../" + "shared", "shared" + "/docs")))


def _repo_files() -> List[str]:
    """Tracked and untracked-but-not-ignored files (a new doc counts before it is committed)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an sdist)
        files = []
        for root, dirs, names in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(root, n), REPO) for n in names]
    return sorted(f for f in files if os.path.isfile(os.path.join(REPO, f)))


def _read_text(path: str):
    with open(os.path.join(REPO, path), "rb") as f:
        data = f.read()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def markdown_links(text: str) -> List[str]:
    """
    Args:
        text (str): a Markdown document.

    Returns:
        list[str]: the targets of its inline links, images and reference definitions, outside
        fenced code blocks (a code span inside a link's text is kept: ``[`a.md`](a.md)``).
    """
    text = _FENCE.sub("", text)
    text = _CODE_SPAN.sub(lambda m: "x" * len(m.group(2)), text)
    return _INLINE.findall(text) + _REFERENCE.findall(text)


def broken_links(md_path: str, text: str) -> Iterator[Tuple[str, str]]:
    """
    Args:
        md_path (str): the document's path relative to the repository root.
        text (str): its content.

    Yields:
        (str, str): (target, reason) for each relative link that leaves the repository or names
        nothing; URLs (any scheme) and in-page anchors are not checked.
    """
    root = os.path.realpath(REPO)
    for target in markdown_links(text):
        if _SCHEME.match(target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path.startswith("/"):
            yield target, "absolute path"
            continue
        resolved = os.path.realpath(os.path.join(root, os.path.dirname(md_path), path))
        if os.path.commonpath([root, resolved]) != root:
            yield target, "outside the repository"
        elif not os.path.exists(resolved):
            yield target, "no such file"


def test_link_checker_itself():
    text = (
        'See [`docs/METHOD.md`](docs/METHOD.md), ![fig](docs/figures/x.png "title"),\n'
        "[up](../elsewhere/A.md#part), [web](https://example.com/x.md), [here](#section),\n"
        "`[not a link](missing.md)`\n\n```\n[in a fence](fence.md)\n```\n[ref]: ./REF.md\n"
    )
    assert markdown_links(text) == [
        "docs/METHOD.md",
        "docs/figures/x.png",
        "../elsewhere/A.md#part",
        "https://example.com/x.md",
        "#section",
        "./REF.md",
    ]
    reasons = dict(broken_links("README.md", text))
    assert reasons["../elsewhere/A.md#part"] == "outside the repository"
    assert reasons["./REF.md"] == "no such file"
    assert "https://example.com/x.md" not in reasons and "#section" not in reasons
    assert reasons.get("docs/METHOD.md") is None  # exists in the repository


def test_every_markdown_link_stays_inside_the_repository_and_resolves():
    docs = [f for f in _repo_files() if f.lower().endswith(".md")]
    assert "README.md" in docs and "docs/METHOD.md" in docs
    bad = []
    for md in docs:
        text = _read_text(md)
        bad += [f"{md}: ({target}) {why}" for target, why in broken_links(md, text or "")]
    assert not bad, "Markdown links that leave the repository or name nothing:\n" + "\n".join(bad)


def test_no_text_file_refers_to_documents_outside_the_repository():
    bad = []
    for path in _repo_files():
        text = _read_text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if _OUTSIDE.search(line):
                bad.append(f"{path}:{number}: {line.strip()}")
    assert not bad, "references to files outside the repository:\n" + "\n".join(bad)


def _method_tables() -> List[List[str]]:
    """The cells of every Markdown table row in docs/METHOD.md."""
    rows = []
    for line in _read_text(os.path.join("docs", "METHOD.md")).splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _numbers(text: str) -> List[float]:
    return [float(x) for x in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?", text)]


def test_method_doc_names_every_switch_with_its_current_default():
    from acamkd import get_acamkd_cfg

    acam = get_acamkd_cfg().MODEL.ACAMKD
    # The switches of the method; the rest of MODEL.ACAMKD names the student, the teacher and
    # the segmentation backbones, which the README and the configs document.
    keys = [
        k
        for k, v in acam.items()
        if not isinstance(v, type(acam)) and k not in ("STUDENT_META_ARCHITECTURE",)
    ]
    assert "NORMALIZER" in keys and "MASK_OBJECTIVE" in keys
    text = _read_text(os.path.join("docs", "METHOD.md"))
    missing = [k for k in keys if f"`{k}" not in text]
    assert not missing, f"docs/METHOD.md does not mention MODEL.ACAMKD keys {missing}"

    # The table of readings: | question | `KEY` | default | other values | how chosen |.
    checked = set()
    for cells in _method_tables():
        if len(cells) != 5:
            continue
        row_keys = re.findall(r"`([A-Z_]+)`", cells[1])
        if not row_keys or not all(k in keys for k in row_keys):
            continue
        for key in row_keys:
            default = acam[key]
            if isinstance(default, bool):
                assert str(default) in cells[2], (key, cells[2])
            elif isinstance(default, str):
                assert f"`{default}`" in cells[2], (key, cells[2])
            elif isinstance(default, (int, float)):
                assert any(abs(x - default) <= 1e-12 for x in _numbers(cells[2])), (key, cells)
            checked.add(key)
    for key in ("NORMALIZER", "MASK_OBJECTIVE", "DETACH_STUDENT_IN_MASKS", "MASKS", "MASK_SOURCE"):
        assert key in checked, f"docs/METHOD.md's table of readings has no row for {key}"


def test_readme_links_the_method_doc():
    assert "](docs/METHOD.md)" in _read_text("README.md")


def _layout() -> str:
    """The "Repository layout" section of docs/LAYOUT.md."""
    text = _read_text(os.path.join("docs", "LAYOUT.md"))
    return text.split("## Repository layout\n", 1)[1].split("\n## ", 1)[0]


def test_layout_page_names_every_module_and_tool():
    layout = _layout()
    package = "projects/ACAMKD/acamkd/"
    missing = []
    for f in _repo_files():
        if f.startswith(package) and f.endswith(".py"):
            rel = f[len(package) :]  # e.g. training/common.py, modeling/meta_arch/distiller.py
            folder, name = os.path.split(rel)
            if folder and name == "__init__.py":
                continue  # a subpackage's: its modules are what is listed
            # Listed as its path, or by its name on its folder's line(s).
            if rel not in layout and not (folder and f"{folder}/" in layout and name in layout):
                missing.append(f)
        elif f.startswith("tools/") and os.path.basename(f) not in layout:
            missing.append(f)
    assert not missing, f"docs/LAYOUT.md's 'Repository layout' does not list {missing}"


# The README is for users: what the project is, how to run it, where the rest is. Studies, lab
# notes and details live in docs/ and are linked from it.
README_MAX_LINES = 300


def test_readme_is_short():
    lines = _read_text("README.md").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move details to a page "
        "under docs/ and link it"
    )


def _docs_pages() -> List[str]:
    """The Markdown pages directly under docs/."""
    return [f for f in _repo_files() if re.fullmatch(r"docs/[^/]+\.md", f)]


def test_readme_links_every_docs_page():
    readme_links = markdown_links(_read_text("README.md"))
    links = {os.path.normpath(t.split("#", 1)[0]) for t in readme_links}
    pages = _docs_pages()
    assert "docs/STUDIES.md" in pages
    unlinked = [p for p in pages if os.path.normpath(p) not in links]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_every_figure_is_shown_by_a_page():
    # Pages in docs/ link figures as figures/x.png (resolved by the link test); none is orphaned.
    figures = {f for f in _repo_files() if f.startswith("docs/figures/")}
    shown = set()
    for md in [f for f in _repo_files() if f.lower().endswith(".md")]:
        for target in markdown_links(_read_text(md) or ""):
            path = os.path.normpath(os.path.join(os.path.dirname(md), target.split("#", 1)[0]))
            if path in figures:
                shown.add(path)
    assert figures and not (figures - shown), f"figures no page shows: {sorted(figures - shown)}"


def test_readme_and_docs_state_facts_not_issue_history():
    # "the code before issue 16" tells a user nothing: say which setting, not when.
    pattern = re.compile(r"\bissues? #?\d+", re.IGNORECASE)
    bad = []
    for md in ["README.md"] + _docs_pages():
        for number, line in enumerate(_read_text(md).splitlines(), 1):
            if pattern.search(line):
                bad.append(f"{md}:{number}: {line.strip()}")
    assert not bad, "issue numbers in the documentation:\n" + "\n".join(bad)
