"""Compares the verdict rows two test runs logged (tests/conftest.py, MLX_VERIFY_VERDICT_LOG)
under two environments, e.g. the lowest and the newest supported transformers.

    python scripts/compare_verdicts.py A.jsonl B.jsonl [TEST_FILE ...]

With TEST_FILE arguments only the rows of those test files are compared.

Prints one line of counts and every row whose verdict, first divergence or localized
part differs; exits 1 when any row differs or a row is missing on one side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: Path, tests: list[str]) -> tuple[str, dict[str, dict[str, object]]]:
    rows: dict[str, dict[str, object]] = {}
    versions = set()
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        if tests and not any(row["key"].startswith(t + "::") for t in tests):
            continue
        versions.add(row.pop("transformers"))
        rows[row.pop("key")] = row
    return "/".join(sorted(versions)) or "none", rows


def main(argv: list[str]) -> int:
    tests = argv[2:]
    (name_a, a), (name_b, b) = load(Path(argv[0]), tests), load(Path(argv[1]), tests)
    differing = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    print(f"verdict rows: {len(a)} under transformers {name_a}, {len(b)} under transformers "
          f"{name_b}; {len(differing)} differ, {len(only_a) + len(only_b)} on one side only")
    for key in differing:
        print(f"  differs: {key}: {a[key]} vs {b[key]}")
    for key in only_a:
        print(f"  only under {name_a}: {key}")
    for key in only_b:
        print(f"  only under {name_b}: {key}")
    return 1 if differing or only_a or only_b or not a else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
