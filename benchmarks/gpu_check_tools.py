"""Small parsers benchmarks/gpu_check.sh needs (standard library only).

  ptxas BUILD_LOG      one line per kernel compiled with `-Xptxas -v`: name, arch, registers,
                       spill stores / loads (bytes), stack frame (bytes); the fallback until
                       scripts/kernel_resources.py exists
  junit OUT IN...      merges pytest's junit files into one (<testsuites>) and prints per-core
                       totals as `summary:` lines (the core from the test id: cuda-cudnn, ...)
"""
import collections
import re
import sys
import xml.etree.ElementTree as ET

ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\w+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"ptxas info\s*: Used (\d+) registers")
PROPERTIES = re.compile(r"Function properties for (\S+)")


def demangle(names):
    """c++filt's names where it is installed, else the mangled ones."""
    import shutil
    import subprocess
    if not names or shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    lines = out.splitlines()
    return lines if len(lines) == len(names) else names


def ptxas(path):
    """(name, arch, registers, spill stores, spill loads, stack) per entry function of the log,
    in the order ptxas compiled them (ptxas prints the entry, its properties and frame, then its
    registers; the properties of a non-inlined device function name that function, skipped)."""
    rows, current, props_of = [], None, None
    with open(path, errors="replace") as f:
        for line in f:
            if m := ENTRY.search(line):
                current = {"name": m.group(1), "arch": m.group(2)}
            elif m := PROPERTIES.search(line):
                props_of = m.group(1)
            elif current is not None and props_of == current["name"] and (m := FRAME.search(line)):
                current.update(stack=int(m.group(1)), stores=int(m.group(2)), loads=int(m.group(3)))
            elif current is not None and (m := REGS.search(line)):
                current["registers"] = int(m.group(1))
                rows.append(current)
                current = None
    names = demangle([r["name"] for r in rows])
    print(f"{'kernel':<90} {'arch':<6} {'regs':>5} {'spill st':>9} {'spill ld':>9} {'stack':>6}")
    for row, name in zip(rows, names):
        short = re.sub(r"\s+", " ", name)[:90]
        print(f"{short:<90} {row['arch']:<6} {row['registers']:>5} {row.get('stores', 0):>9} "
              f"{row.get('loads', 0):>9} {row.get('stack', 0):>6}")
    spilling = [r for r in rows if r.get("stores", 0) or r.get("loads", 0)]
    print(f"summary: {len(rows)} kernels compiled; {len(spilling)} spill; max registers "
          f"{max((r['registers'] for r in rows), default=0)}; max stack {max((r.get('stack', 0) for r in rows), default=0)} B")
    return 0 if rows else 1


CORE = re.compile(r"\b(?:cpu|cuda)-(cudnn|cuda|efficient|composed|cpu|simt)\b")


def junit(out_path, paths):
    merged = ET.Element("testsuites")
    totals = collections.defaultdict(collections.Counter)
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as e:  # a run killed before writing its file
            print(f"summary: {path}: no junit ({type(e).__name__})")
            continue
        for suite in ([root] if root.tag == "testsuite" else list(root)):
            merged.append(suite)
            for case in suite.iter("testcase"):
                if not case.get("name"):  # what pytest writes for a run interrupted mid-test
                    continue
                m = CORE.search(case.get("name", ""))
                kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
                totals[m.group(1) if m else "(no core)"][kind] += 1
    ET.ElementTree(merged).write(out_path, encoding="utf-8", xml_declaration=True)
    for core, c in sorted(totals.items()):
        print(f"summary: core {core:<10} passed {c['passed']:>4}  failed {c['failure'] + c['error']:>4}  "
              f"skipped {c['skipped']:>4}")
    return 0


def main(argv):
    if len(argv) >= 2 and argv[0] == "ptxas":
        return ptxas(argv[1])
    if len(argv) >= 2 and argv[0] == "junit":
        return junit(argv[1], argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
