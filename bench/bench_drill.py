"""The multi-node drill on object storage only, timed phase by phase (see ``drill.py``).

A real S3 server (moto, IAM auth) and a head plus a node on 127.0.0.2 (node c joins on
127.0.0.3 after node b is killed): raw text uploaded → data job → shards on S3 → reference
2-rank run → the same run with node b SIGKILLed after step 8's checkpoint, resumed on node c
→ export from S3. Prints each phase's wall time and the checks the test makes (bitwise
losses, placement), as a table and with ``--json``.

    python bench/bench_drill.py [--no-reference] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import drill


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-reference", action="store_true", help="skip the uninterrupted run")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    with (
        drill.s3_server() as server,
        drill.multinode(server, {"b": "127.0.0.2"}) as cluster,
        tempfile.TemporaryDirectory() as tmp,
    ):
        got = drill.run_drill(cluster, server, Path(tmp), reference=not args.no_reference)
        resumes = drill.records(got.run, "resume")  # read while the bucket is up
        ours = drill.step_losses(got.run)
        bitwise = ours == drill.step_losses(got.ref_run) if got.ref_run else None
    print(f"\n{'phase':<52} {'wall s':>8}")
    for phase, seconds in got.phases.items():
        print(f"{phase:<52} {seconds:8.1f}")
    print(f"{'total':<52} {sum(got.phases.values()):8.1f}")
    print(
        f"\nnode b killed after step-{got.kill_after}; node c's rank placed "
        f"{got.replaced_s:.1f} s after the kill; resumed from step "
        f"{resumes[0]['step'] if resumes else '-'} in "
        f"{resumes[0]['load_seconds'] if resumes else float('nan'):.2f} s; ranks before "
        f"{got.placements.get('before')}, after {got.placements.get('after')}; losses bitwise "
        f"equal to the uninterrupted run: {bitwise}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"phases": got.phases, "replaced_s": got.replaced_s, "resumes": resumes,
                 "bitwise": bitwise, "placements": got.placements},
                indent=1, default=str,
            )
        )  # fmt: skip
    return 0 if bitwise in (True, None) and resumes else 1


if __name__ == "__main__":
    sys.exit(main())
