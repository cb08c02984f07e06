"""Print how the running environment differs from requirements-lock.txt (run by `make test-latest`).

Usage: python scripts/lock_drift.py [LOCK]. Exit status is 0 either way: drift is a report, not a failure.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_pins(path: Path) -> dict[str, str]:
    """{canonical name: version} for every ``name==version`` line of a pip requirements lock."""
    pins = {}
    for line in path.read_text().splitlines():
        m = PIN.match(line.strip())
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def installed_versions() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def drift(pins: dict[str, str], installed: dict[str, str]) -> list[tuple[str, str, str]]:
    """(name, locked, installed) for every locked package whose installed version differs ("-" if missing)."""
    return [(n, v, installed.get(n, "-")) for n, v in sorted(pins.items()) if installed.get(n) != v]


def main(argv: list[str]) -> int:
    lock = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "requirements-lock.txt"
    rows = drift(locked_pins(lock), installed_versions())
    if not rows:
        print(f"lock drift: none; this environment matches {lock.name}")
        return 0
    print(f"lock drift: {len(rows)} of the packages in {lock.name} differ here")
    width = max(len(n) for n, _, _ in rows)
    for name, locked, now in rows:
        print(f"  {name:<{width}}  locked {locked:<12} installed {now}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
