"""Reliability, measured: SIGKILL rounds per writing command (ingest of text, images, chunked documents and
into an indexed collection; index; dedup --apply; finetune: each killed at a seeded moment, rerun and
compared with a clean run), the suites of tests/reliability/ (disk full and read-only storage, hostile
images, malicious weights, damaged files, hypothesis properties, schemathesis API fuzzing) and concurrency
(writers at once, searches during writes), summed up in one table.

    python scripts/reliability_report.py              # 9 CPU-minutes (26 min wall on 2 cores shared at load 7-9)
    python scripts/reliability_report.py --rounds 10  # more kills per command

Kill rounds are measured here (faults injected / survived, rows lost). For the input suites, "inputs" counts
hypothesis's generated examples where a test is a property (each one an input), else test cases (a
schemathesis case runs 12 examples per operation); each passes only with no crash, a clear error for what
is refused, no row lost and no 5xx. Concurrency: each scenario (two writers at once, searches during an
ingest and a `dedup --apply`) is a fault; inputs are the search answers checked against every committed
version; rows lost and 5xx are what its tests recorded.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import benchlib  # noqa: F401 - puts the checkout first on sys.path

from tests.reliability.faults import ENV, SCENARIOS, Scenario, kill_rounds

ROOT = Path(__file__).resolve().parents[1]
SUITES = {
    "disk full, read-only storage": "tests/reliability/test_full_disk.py",
    "hostile images": "tests/reliability/test_hostile_images.py",
    "malicious weights": "tests/reliability/test_malicious_weights.py",
    "damaged files": "tests/reliability/test_damaged_files.py",
    "hostile values (hypothesis)": "tests/reliability/test_hostile_values.py",
    "HTTP API (schemathesis)": "tests/reliability/test_api_fuzz.py",
    "concurrency (writers, searches during writes)": "tests/reliability/test_concurrency.py",
}


def kill_suite(scenario: Scenario, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        results = kill_rounds(scenario, Path(tmp), list(range(1, rounds + 1)))
    for r in results:
        print(f"  {json.dumps(r)}", file=sys.stderr)
    killed = [r for r in results if r["killed"]]
    return {"suite": f"SIGKILL: {scenario.name}", "faults": len(killed), "survived": sum(r["survived"] for r in killed),
            "inputs": None, "handled": None, "rows_lost": sum(r["lost"] or 0 for r in results), "5xx": None,
            "seconds": round(time.perf_counter() - started, 1), "rounds": results}


def hypothesis_examples(stdout: str) -> list[tuple[int, int]]:
    """(passing, failing) generated examples of each property test, from --hypothesis-show-statistics."""
    out = []
    for section in re.split(r"^\S+::\S+:$", stdout, flags=re.M)[1:]:
        counts = re.findall(r"(\d+) passing, (\d+) failing", section)
        out.append((sum(int(p) for p, _ in counts), sum(int(f) for _, f in counts)))
    return out


def pytest_suite(name: str, path: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path,
                               f"--junitxml={xml}", "--hypothesis-show-statistics"], cwd=ROOT, env=ENV,
                              capture_output=True, text=True)
        suite = ET.parse(xml).getroot().find("testsuite") if xml.exists() else None
    if suite is None:
        raise SystemExit(f"{path} did not run:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    tests, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    ran, failed = tests - skipped, failures + errors
    recorded: dict[str, int] = {}  # what the tests measured (record_property); hypothesis records its own too
    for prop in suite.iter("property"):
        if prop.get("name") in ("answers", "5xx", "rows_lost"):
            recorded[prop.get("name")] = recorded.get(prop.get("name"), 0) + int(prop.get("value"))
    row = {"suite": name, "faults": None, "survived": None, "inputs": ran, "handled": ran - failed,
           "rows_lost": recorded.get("rows_lost", 0 if failed == 0 else None),
           "5xx": recorded.get("5xx", (0 if failed == 0 else None) if "API" in name else None),
           "seconds": round(time.perf_counter() - started, 1)}
    if "answers" in recorded:  # concurrency: scenarios are the faults, the answers checked the inputs
        row.update(faults=ran, survived=ran - failed, inputs=recorded["answers"],
                   handled=recorded["answers"] if failed == 0 else None)
    elif examples := hypothesis_examples(proc.stdout):
        failing_tests = sum(1 for _, f in examples if f)
        row["inputs"] = sum(p + f for p, f in examples) + ran - len(examples)
        row["handled"] = row["inputs"] - sum(f for _, f in examples) - max(0, failed - failing_tests)
    return row


def table(rows: list[dict]) -> str:
    cols = [("suite", "suite"), ("faults", "faults injected"), ("survived", "survived"), ("inputs", "inputs tried"),
            ("handled", "handled"), ("rows_lost", "rows lost"), ("5xx", "5xx")]
    cell = lambda v: "-" if v is None else str(v)  # noqa: E731
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1, help="SIGKILL rounds per command (each: a kill, a rerun, a "
                    "comparison with the clean run)")
    ap.add_argument("--json", type=Path, help="also write the full results here")
    args = ap.parse_args()
    started = time.perf_counter()
    rows = []
    for scenario in SCENARIOS.values():
        print(f"  killing {scenario.name}", file=sys.stderr)
        rows.append(kill_suite(scenario, args.rounds))
    for name, path in SUITES.items():
        print(f"  running {path}", file=sys.stderr)
        rows.append(pytest_suite(name, path))
    print(table(rows))
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
