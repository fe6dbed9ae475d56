#!/usr/bin/env python
"""The Slicer API the MedAnomaly module may call, read from the Slicer source at the supported
release tags: writes `slicer_api.json` beside this script.

    git clone https://github.com/Slicer/Slicer.git /tmp/Slicer
    python MedAnomalyExtension/Testing/Python/make_slicer_api.py /tmp/Slicer [--tags v5.10.0 v5.12.0]

For each tag, from the C++ headers of the libraries the module uses (MRML core and logic, the
segmentation core, the Segmentations, Terminologies and Volumes module logics, the subject
hierarchy), every method name (a declaration `name(`, and the Get/Set/On/Off names of VTK's
property macros); from `Base/Python/slicer/util.py`, every function. The file keeps the names
present at every tag (what works in all supported Slicers) and each tag's commit, so the test
`tests/test_slicer_module.py::test_every_slicer_call_is_in_the_supported_slicer_api` checks
the module against what Slicer has, not against memory.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
from pathlib import Path

TAGS = ("v5.10.0", "v5.12.0")  # the module's supported range starts at 5.10 (MedAnomalyLib.environment)
HEADER_FOLDERS = (
    "Libs/MRML/Core", "Libs/MRML/Logic", "Libs/vtkSegmentationCore",
    "Modules/Loadable/Segmentations/MRML", "Modules/Loadable/Segmentations/Logic",
    "Modules/Loadable/Terminologies/Logic", "Modules/Loadable/Volumes/Logic",
    "Modules/Loadable/SubjectHierarchy/Logic",
)
UTIL = "Base/Python/slicer/util.py"
DECLARATION = re.compile(r"\b([A-Za-z_]\w*)\s*\(")
PROPERTY_MACRO = re.compile(r"\bvtk(Get|Set)\w*Macro\s*\(\s*(\w+)")
BOOLEAN_MACRO = re.compile(r"\bvtkBooleanMacro\s*\(\s*(\w+)")


def _git(source: Path, *arguments: str) -> str:
    return subprocess.run(["git", "-C", str(source), *arguments], check=True, capture_output=True,
                          text=True, encoding="utf-8", errors="replace").stdout


def methods_at(source: Path, tag: str) -> set[str]:
    names: set[str] = set()
    for path in _git(source, "ls-tree", "-r", "--name-only", tag, "--", *HEADER_FOLDERS).split():
        if not path.endswith(".h"):
            continue
        text = _git(source, "show", f"{tag}:{path}")
        names |= set(DECLARATION.findall(text))
        names |= {kind + name for kind, name in PROPERTY_MACRO.findall(text)}
        names |= {name + suffix for name in BOOLEAN_MACRO.findall(text) for suffix in ("On", "Off")}
    return {name for name in names if name[:1].isupper()}  # methods, not C keywords or macros' lower-case


def util_functions_at(source: Path, tag: str) -> set[str]:
    tree = ast.parse(_git(source, "show", f"{tag}:{UTIL}"))
    return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a git clone of github.com/Slicer/Slicer with its tags")
    parser.add_argument("--tags", nargs="+", default=list(TAGS))
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("slicer_api.json"))
    args = parser.parse_args()
    methods = set.intersection(*(methods_at(args.source, tag) for tag in args.tags))
    util = set.intersection(*(util_functions_at(args.source, tag) for tag in args.tags))
    record = {
        "source": "https://github.com/Slicer/Slicer",
        "tags": {tag: _git(args.source, "rev-list", "-n", "1", tag).strip() for tag in args.tags},
        "made_by": "python MedAnomalyExtension/Testing/Python/make_slicer_api.py SLICER_SOURCE --tags "
                   + " ".join(args.tags),
        "header_folders": list(HEADER_FOLDERS),
        "methods": sorted(methods),
        "slicer.util": sorted(util),
    }
    args.output.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"{len(methods)} methods, {len(util)} slicer.util functions at {', '.join(args.tags)} -> {args.output}")


if __name__ == "__main__":
    main()
