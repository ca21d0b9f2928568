"""Fault injection at full count: the trials of tests/faults.py (where each fault and
what "survived" means for it are defined), with many more random kill -9s.

    python bench/faults.py                 # every fault, 20 random kill -9s
    python bench/faults.py --kills 5 --only kill9,sigterm

Prints one JSON line per fault ({"fault", "trials", "survived", "data_lost_tokens", ...})
and then a table. tests/train/test_faults.py runs the same trials at a smaller count.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import faults  # noqa: E402
from tests.sample_presets import CORPUS  # noqa: E402

FAULTS = {"kill9": None, "rotation": faults.fault_rotation, "sigterm": faults.fault_sigterm,
          "enospc": faults.fault_enospc, "nan": faults.fault_nan, "oom": faults.fault_oom,
          "ddp_rank": faults.fault_ddp_rank}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--only", default=",".join(FAULTS))
    args = ap.parse_args()
    if not (CORPUS / "books").is_dir():
        sys.exit(f"corpus not found at {CORPUS / 'books'}")
    rows = []
    for name in args.only.split(","):
        row = faults.fault_kill9(args.kills) if name == "kill9" else FAULTS[name]()
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'fault':<10} {'trials':>6} {'survived':>8} {'data lost (tokens)':>19}")
    for r in rows:
        lost = "-" if r["data_lost_tokens"] is None else r["data_lost_tokens"]
        print(f"{r['fault']:<10} {r['trials']:>6} {r['survived']:>8} {lost:>19}")


if __name__ == "__main__":
    main()
