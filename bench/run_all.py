"""`make bench`: every benchmark in its quick form, one after the other, each comparing crucible
with its baseline side by side in the same run (ratios are what to read; the machine is noisy).

For the full-size figures run the scripts directly, e.g. ``python bench/bench_data_pipeline.py
--mb 200`` (needs the bench extra: ``pip install -e '.[bench]'`` for datatrove).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

RUNS = [
    ("model: GPT fwd+bwd vs a textbook reference GPT", ["bench_model.py", "--quick"]),
    ("shards: tokenize+pack vs raw tokenizers; reader vs pyarrow", ["bench_shards.py", "--mbytes", "2", "--repeats", "2", "--steps", "50"]),
    ("train: crucible train vs a bare DeepSpeed loop; checkpoint save vs raw write", ["bench_train.py", "--preset", "tiny", "--steps", "40", "--rounds", "2", "--saves", "2"]),
    ("data pipeline: full chain vs datatrove", ["bench_data_pipeline.py", "--quick"]),
    ("data pipeline on Ray: peak worker heap as the corpus doubles", ["bench_data_pipeline.py", "--ray-memory", "10,20", "--part-mb", "2.5", "--partition-mb", "1"]),
    ("reader order: Feistel permutation vs a materialised one (memory, indices/s)", ["bench_permutation.py"]),
    ("resume: verification on and off, local disk and S3", ["bench_resume.py", "--preset", "tiny", "--rounds", "2"]),
    ("multi-node drill on object storage only, phase by phase", ["bench_drill.py"]),
]  # fmt: skip


def main() -> int:
    failed = []
    for title, argv in RUNS:
        if argv[0] == "bench_data_pipeline.py" and importlib.util.find_spec("datatrove") is None:
            argv = [*argv, "--no-datatrove"]
            title += " (datatrove not installed: pip install -e '.[bench]')"
        print(f"\n=== {title}\n", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, str(HERE / argv[0]), *argv[1:]])
        print(f"--- {argv[0]}: exit {rc}, {time.monotonic() - t0:.0f} s", flush=True)
        if rc:
            failed.append(argv[0])
    if failed:
        print(f"\nbenchmarks that failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
