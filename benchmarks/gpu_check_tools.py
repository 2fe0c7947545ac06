"""The junit merge benchmarks/gpu_check.sh needs (standard library only; the ptxas table is
scripts/kernel_resources.py's).

  junit OUT IN...      merges pytest's junit files into one (<testsuites>) and prints per-core
                       totals as `summary:` lines (the core from the test id: cuda-cudnn, ...)
"""
import collections
import re
import sys
import xml.etree.ElementTree as ET

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
    if len(argv) >= 2 and argv[0] == "junit":
        return junit(argv[1], argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
