"""Every `docs/design.md §N` cited in the repository names a section that exists there, and nothing
cites the design notes that live outside the repository (upper-case file name).

Plain text scanning (pathlib + re): no torch needed, well under a second.
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
THIS_FILE = Path(__file__).resolve()

SCAN_DIRS = ("csrc", "python", "tests", "benchmarks", "examples", "scripts")
SCAN_FILES = ("README.md", "CMakeLists.txt", "setup.py")
# Build output installed into the package directory (see .gitignore), not sources.
BUILD_OUTPUT = tuple(ROOT / "python" / "torch_mla" / d for d in ("lib", "include", "share"))
SKIP_DIR_NAMES = {"__pycache__", ".pytest_cache"}

CITATION = re.compile(r"design\.md §(\d+(?:\.\d+)?)")
OUT_OF_REPO = re.compile(r"(?<![/\w])DESIGN\.md")
SECTION = re.compile(r"^##\s+(\d+)\.\s")
SUBSECTION = re.compile(r"^###\s+(\d+\.\d+)\.?\s")


def design_sections():
    sections, in_fence = set(), False
    for line in DESIGN.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        m = SECTION.match(line) or SUBSECTION.match(line)
        if m:
            sections.add(m.group(1))
    return sections


def _skipped(path):
    if path.resolve() == THIS_FILE:
        return True
    if any(part in SKIP_DIR_NAMES for part in path.relative_to(ROOT).parts):
        return True
    return any(path == d or d in path.parents for d in BUILD_OUTPUT)


def scanned_files():
    files = [ROOT / f for f in SCAN_FILES if (ROOT / f).is_file()]
    for d in SCAN_DIRS:
        if (ROOT / d).is_dir():
            files.extend(p for p in sorted((ROOT / d).rglob("*")) if p.is_file())
    return [p for p in files if not _skipped(p)]


def text_lines(path):
    """(line number, line) of a text file; nothing for binary or non-UTF-8 files."""
    data = path.read_bytes()
    if b"\0" in data:
        return []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return []
    return list(enumerate(text.splitlines(), start=1))


def scan():
    """(citations [(where, section)], out-of-repo references [where]) over the scanned files."""
    citations, out_of_repo = [], []
    for path in scanned_files():
        rel = path.relative_to(ROOT).as_posix()
        for lineno, line in text_lines(path):
            citations.extend((f"{rel}:{lineno}", m.group(1)) for m in CITATION.finditer(line))
            if OUT_OF_REPO.search(line):
                out_of_repo.append(f"{rel}:{lineno}")
    return citations, out_of_repo


def test_design_has_numbered_sections():
    sections = design_sections()
    assert {"1", "3", "3.4", "10.3"} <= sections, sorted(sections)


def test_every_citation_names_an_existing_section():
    sections = design_sections()
    citations, _ = scan()
    assert citations, "no `docs/design.md §N` citation found in the scanned files"
    dangling = [f"{where}: §{sec}" for where, sec in citations if sec not in sections]
    assert not dangling, ("citations of sections docs/design.md does not have:\n" + "\n".join(dangling))


def test_nothing_cites_the_out_of_repo_notes():
    _, out_of_repo = scan()
    assert not out_of_repo, ("cite docs/design.md instead of the out-of-repo design notes:\n"
                             + "\n".join(out_of_repo))
