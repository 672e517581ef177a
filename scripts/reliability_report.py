"""Reliability, measured: SIGKILL rounds per writing command (ingest of text, images, chunked documents and
into an indexed collection; index; dedup --apply; finetune: each killed at a seeded moment, rerun and
compared with a clean run), and the suites of tests/reliability/ (disk full and read-only storage, hostile
images, malicious weights, damaged files, hypothesis properties, schemathesis API fuzzing), summed up in
one table.

    python scripts/reliability_report.py              # 9 CPU-minutes (26 min wall on 2 cores shared at load 7-9)
    python scripts/reliability_report.py --rounds 10  # more kills per command

Kill rounds are measured here (faults injected / survived, rows lost). For the suites, "inputs" counts
their test cases (a hypothesis or schemathesis case runs 12-25 generated examples); each passes only with
no crash, a clear error for what is refused, no row lost and no 5xx.
"""

from __future__ import annotations

import argparse
import json
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


def pytest_suite(name: str, path: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path,
                               f"--junitxml={xml}"], cwd=ROOT, env=ENV, capture_output=True, text=True)
        suite = ET.parse(xml).getroot().find("testsuite") if xml.exists() else None
    if suite is None:
        raise SystemExit(f"{path} did not run:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    tests, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    ran = tests - skipped
    return {"suite": name, "faults": None, "survived": None, "inputs": ran, "handled": ran - failures - errors,
            "rows_lost": 0 if failures + errors == 0 else None, "5xx": (0 if failures + errors == 0 else None)
            if "API" in name else None, "seconds": round(time.perf_counter() - started, 1)}


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
