"""README.md cannot rot: every ```python block runs (each in a fresh namespace; a ```text block
right after one is its expected output), every ```sh command names things that exist (make
targets, modules and their flags, files), and the C++/CMake snippets name real API."""
import contextlib
import importlib.util
import io
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)


def blocks():
    """(language, code, line number, the following block) for every fenced block."""
    found = [(m.group(1), m.group(2), README.count("\n", 0, m.start()) + 1, m.start(), m.end())
             for m in FENCE.finditer(README)]
    result = []
    for i, (lang, code, line, _, end) in enumerate(found):
        following = None
        if i + 1 < len(found) and not README[end:found[i + 1][3]].strip():
            following = found[i + 1][:2]
        result.append((lang, code, line, following))
    return result


def of_language(*langs):
    return [pytest.param(code, following, id=f"line{line}")
            for lang, code, line, following in blocks() if lang in langs]


def test_readme_has_the_blocks_it_should():
    langs = [lang for lang, *_ in blocks()]
    assert langs.count("python") >= 5 and "sh" in langs and "cpp" in langs and "cmake" in langs
    assert all(lang for lang in langs), "every fenced block names its language"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("code,following", of_language("python"))
def test_python_block_runs(code, following):
    for module in re.findall(r"^(?:from|import) (\w+)", code, re.M):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    if following is not None and following[0] == "text":
        assert stdout.getvalue() == following[1]


def commands(code):
    """The command lines of a shell block, comments and leading VAR=value assignments dropped."""
    for line in code.splitlines():
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"\w+=\S*", words[0]):
            words.pop(0)
        if words:
            yield words


MAKE_TARGETS = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))


@lru_cache(maxsize=None)
def module_help(python, module):
    return subprocess.run([python, "-m", module, "--help"], capture_output=True, text=True,
                          check=True, timeout=300).stdout


def check_python(words):
    python = sys.executable
    if words[1:3] == ["-m", "pytest"]:
        paths = [w for w in words[3:] if not w.startswith("-")]
        assert paths and all((ROOT / p).exists() for p in paths), words
    elif words[1] == "-m":
        module = words[2]
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
        usage = module_help(python, module)
        for flag in (w.split("=")[0] for w in words[3:] if w.startswith("--")):
            assert flag in usage, f"{module} has no option {flag}"
    else:
        assert (ROOT / words[1]).is_file(), words


def check_command(words):
    program = words[0]
    if program == "make":
        targets = [w for w in words[1:] if not w.startswith("-")]
        assert targets and set(targets) <= MAKE_TARGETS, f"Makefile lacks {set(targets) - MAKE_TARGETS}"
    elif Path(program).name in ("python", "python3"):
        check_python(words)
    elif program == "pip":
        assert words[1] == "install" and words[-1] == "." and (ROOT / "pyproject.toml").is_file(), words
    elif program == "bash":
        assert (ROOT / words[1]).is_file(), words
    else:
        pytest.fail(f"README runs {program!r}, which this test does not know how to check")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("code,following", of_language("sh", "bash"))
def test_shell_commands_exist(code, following):
    for words in commands(code):
        check_command(words)


def test_make_targets_run_the_readme_commands():
    makefile = (ROOT / "Makefile").read_text()
    assert {"demo", "test", "bench"} <= MAKE_TARGETS
    assert "-m torch_mla.demo" in makefile and "pytest" in makefile and "-m torch_mla.bench" in makefile


def test_cpp_and_cmake_snippets_name_real_api():
    headers = "\n".join(p.read_text() for p in (ROOT / "csrc" / "torch_mla").rglob("*.h"))
    cpp = "\n".join(code for lang, code, *_ in blocks() if lang == "cpp")
    for include in re.findall(r"#include <(torch_mla/[\w/.]+)>", cpp):
        assert (ROOT / "csrc" / include).is_file(), include
    for name in set(re.findall(r"torch_mla::(\w+)", cpp)):
        assert re.search(rf"\b(struct|class|TORCH_MODULE\(|at::Tensor) ?{name}\b", headers), name
    cmake = "\n".join(code for lang, code, *_ in blocks() if lang == "cmake")
    for package in re.findall(r"find_package\((\w+)", cmake):
        assert (ROOT / "cmake" / f"{package}Config.cmake.in").is_file(), package
    cmake_lists = (ROOT / "CMakeLists.txt").read_text()
    for namespace, target in re.findall(r"(\w+)::(\w+)", cmake):
        assert f"NAMESPACE {namespace}::" in cmake_lists and f"TARGETS {target} " in cmake_lists


def test_images_exist():
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README):
        path = ROOT / image
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
