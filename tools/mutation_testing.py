"""Mutation testing of the core's numeric modules with mutmut (`make mutation`; not part of CI).

mutmut 3 imports the mutated code from `mutants/`, `mutants/src` or `mutants/source` only, while the
package lives in `core/`. So this script stages a throwaway tree under `build/mutation/`: the package
as `src/medanomaly`, the tests of the chosen modules, and a pyproject with the mutmut settings; runs
mutmut there; and prints, per module, how many mutants the tests killed and which survived. With
`--markdown FILE` it writes that summary as a table and a list (docs/MUTATION.md is made that way).

    python tools/mutation_testing.py                       # every module (hours on 2 cores)
    python tools/mutation_testing.py --modules masking latent --max-children 2
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# module -> (its source below core/medanomaly, the test files that exercise it)
MODULES = {
    "metrics": ("metrics.py", ["test_metrics.py"]),
    "scoring": ("scoring.py", ["test_scoring.py"]),
    "masking": ("masking.py", ["test_masking.py"]),
    "latent": ("latent.py", ["test_latent.py"]),
    "anomalies": ("anomalies", ["test_anomalies.py"]),
}
TEST_HELPERS = ["conftest.py", "checks.py"]
KILLED = {"killed", "timeout", "segfault"}  # mutmut counts timeouts as detected; a crash is detection too
NOT_RUN = {"no tests", "skipped", "not checked"}


def stage(workdir: Path, modules: list[str]) -> None:
    """Copy the package and the chosen tests into `workdir` in mutmut's `src/` layout."""
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.copytree(REPO / "core" / "medanomaly", workdir / "src" / "medanomaly",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (workdir / "tests").mkdir(parents=True)
    # mutmut writes mutants/src after it starts, but Python ignores a PYTHONPATH folder for good once an
    # import found it missing: without it the tests import the unmutated package and mutmut finds no
    # test that covers any mutant
    (workdir / "mutants" / "src").mkdir(parents=True)
    tests = sorted({t for m in modules for t in MODULES[m][1]})
    for name in TEST_HELPERS + tests:
        shutil.copy(REPO / "tests" / name, workdir / "tests" / name)
    # the whole package is copied into mutants/ (the tests import all of it), only the modules mutate
    patterns = ", ".join(f'"src/medanomaly/{MODULES[m][0]}"' if MODULES[m][0].endswith(".py")
                         else f'"src/medanomaly/{MODULES[m][0]}/*"' for m in modules)
    test_files = ", ".join(f'"tests/{t}"' for t in tests)
    (workdir / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        'source_paths = ["src/medanomaly"]\n'
        f"only_mutate = [{patterns}]\n"
        f"pytest_add_cli_args_test_selection = [{test_files}]\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-m", "not slow", "-q"]\n'
        "[tool.pytest.ini_options]\n"
        'markers = ["slow: long-running test"]\n'
    )


def mutmut() -> str:
    """The mutmut of this Python's environment."""
    path = Path(sys.executable).with_name("mutmut")
    if not path.exists():
        sys.exit(f"mutmut is not installed in {sys.prefix}: pip install -e '.[mutation]'")
    return str(path)


def run_mutmut(workdir: Path, max_children: int) -> None:
    # the staged tree must win over the editable install of core/ that the environment has; one thread
    # per test process: mutmut forks a child per mutant, and a forked OpenMP pool can hang
    env = {**os.environ, "PYTHONPATH": str(workdir / "mutants" / "src"), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    subprocess.run([mutmut(), "run", "--max-children", str(max_children)], cwd=workdir, env=env, check=True)


def results(workdir: Path) -> dict[str, str]:
    """{mutant name: status} for every mutant mutmut made."""
    out = subprocess.run([mutmut(), "results", "--all", "true"],
                         cwd=workdir, capture_output=True, text=True, check=True).stdout
    pairs = (re.match(r"\s*(\S+): (.+)$", line) for line in out.splitlines())
    return {m[1]: m[2].strip() for m in pairs if m}


def module_of(mutant: str) -> str:
    """`medanomaly.anomalies.poisson.x_solve__mutmut_3` -> `anomalies`."""
    return mutant.split(".")[1]


def summarise(statuses: dict[str, str]) -> dict[str, dict]:
    table: dict[str, dict] = defaultdict(lambda: {"killed": 0, "survived": [], "not_run": 0})
    for name, status in sorted(statuses.items()):
        row = table[module_of(name)]
        if status in KILLED:
            row["killed"] += 1
        elif status in NOT_RUN:
            row["not_run"] += 1
        else:
            row["survived"].append(name)
    return dict(table)


def markdown(table: dict[str, dict], command: str) -> str:
    lines = [f"`{command}`", "", "| module | mutants tested | killed | survived | score |",
             "| --- | --- | --- | --- | --- |"]
    for module, row in table.items():
        tested = row["killed"] + len(row["survived"])
        score = 100.0 * row["killed"] / tested if tested else float("nan")
        lines.append(f"| {module} | {tested} | {row['killed']} | {len(row['survived'])} | {score:.1f} % |")
    for module, row in table.items():
        if row["survived"]:
            lines += ["", f"Surviving in `{module}` (`mutmut show NAME` in the run's `--workdir`, default "
                      "build/mutation, prints each diff):", ""]
            lines += [f"- `{name}`" for name in row["survived"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="+", choices=list(MODULES), default=list(MODULES))
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", type=Path, default=REPO / "build" / "mutation")
    parser.add_argument("--report-only", action="store_true", help="summarise the last run in --workdir")
    parser.add_argument("--markdown", type=Path, help="also write the summary to this Markdown file")
    args = parser.parse_args(argv)
    if not args.report_only:
        stage(args.workdir, args.modules)
        run_mutmut(args.workdir, args.max_children)
    table = summarise(results(args.workdir))
    command = "python tools/mutation_testing.py --modules " + " ".join(args.modules)
    text = markdown(table, command)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
