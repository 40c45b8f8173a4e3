"""Per-rank memory and speed of the epoch order: Feistel permutation vs a materialised one.

For each split size n, one rank builds its epoch order and draws ``--batches`` batches of
``--batch-size`` consecutive stream positions, the way ``TrainingReader`` does. The baseline
is the order the reader materialises today, ``np.random.default_rng([seed, epoch])
.permutation(n)`` (8 bytes per sample on every rank), then indexed per batch; it runs side by
side in the same process. Memory is the tracemalloc peak of build + draws (numpy reports its
array allocations to tracemalloc), so it counts what the order costs, not the interpreter.
Speed is timed separately, without tracemalloc, best of ``--repeats``.

    python bench/bench_permutation.py            # n = 10^6, 10^8, 10^10; baseline at 10^6 only
    python bench/bench_permutation.py --full     # also the 800 MB baseline at 10^8
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
import psutil

from crucible.data_pipeline.permutation import FeistelPermutation

SEED, EPOCH = 0, 0


def human(nbytes: float) -> str:
    """``nbytes`` in B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.2f} GiB"


def feistel(n: int) -> Callable[[np.ndarray], np.ndarray]:
    """The stateless order: positions to samples, computed per call."""
    return FeistelPermutation(n, SEED, EPOCH)


def materialised(n: int) -> Callable[[np.ndarray], np.ndarray]:
    """The reader's current order: one int64 per sample, then indexed."""
    order = np.random.default_rng([SEED, EPOCH]).permutation(n)
    return lambda pos: order[pos]


def measure(
    build: Callable[[int], Callable], n: int, batches: list[np.ndarray], repeats: int
) -> dict[str, float]:
    """Build time, draw rate (best of ``repeats``) and tracemalloc peak of one way of
    ordering ``n`` samples and drawing ``batches``."""
    builds: list[float] = []
    draws: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        order = build(n)
        t1 = time.perf_counter()
        for pos in batches:
            order(pos)
        draws.append(time.perf_counter() - t1)
        builds.append(t1 - t0)
        del order
    tracemalloc.start()
    order = build(n)
    for pos in batches:
        order(pos)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del order
    draw = min(draws)
    return {
        "build_s": min(builds),
        "draw_s": draw,
        "rate": sum(len(b) for b in batches) / draw,
        "batch_us": draw / len(batches) * 1e6,
        "peak": peak,
    }


def timed(fn: Callable[[np.ndarray], np.ndarray], arg: np.ndarray) -> float:
    """Seconds one call ``fn(arg)`` takes."""
    t0 = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t0


def row(n: int, name: str, r: dict[str, float]) -> str:
    """One line of the table."""
    return (
        f"{n:>8.0e}  {name:<14}{r['build_s']:>10.4f}{r['rate'] / 1e6:>14.2f}"
        f"{r['batch_us']:>10.0f}{human(r['peak']):>14}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e6,1e8,1e10", help="comma-separated split sizes")
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=1024, help="positions per batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="run baselines of up to 8 GB")
    args = ap.parse_args()

    print(
        f"{args.batches} batches of {args.batch_size} consecutive positions per n; memory = "
        "tracemalloc peak of build + draws (numpy allocations), speed without tracemalloc\n"
    )
    header = (
        f"{'n':>8}  {'order':<14}{'build s':>10}{'draw M idx/s':>14}{'µs/batch':>10}"
        f"{'peak memory':>14}"
    )
    print(header)
    print("-" * len(header))
    for n in (int(float(s)) for s in args.sizes.split(",")):
        rng = np.random.default_rng(1)
        starts = rng.integers(0, n - args.batch_size + 1, args.batches)
        batches = [np.arange(s, s + args.batch_size) for s in starts]
        f = measure(feistel, n, batches, args.repeats)
        print(row(n, "feistel", f))
        big = np.arange(n - min(n, 10**6), n)  # one large call: arithmetic, not call overhead
        perm = FeistelPermutation(n, SEED, EPOCH)
        big_s = min(timed(perm, big) for _ in range(args.repeats))
        rate = big.size / big_s / 1e6
        print(f"{'':>8}  {'':<14}one call of {big.size:,} positions: {rate:.2f} M idx/s")
        need, avail = 8 * n, psutil.virtual_memory().available
        if need > (8e9 if args.full else 1e8) or 2 * need > avail:
            why = f"needs {human(need)} per rank"
            why += f", {human(avail)} available" if 2 * need > avail else ""
            why += "; pass --full" if need <= 8e9 and not args.full else ""
            print(f"{n:>8.0e}  {'materialised':<14}not run: {why}")
            continue
        m = measure(materialised, n, batches, args.repeats)
        print(row(n, "materialised", m))
        print(
            f"{'':>8}  feistel / materialised: memory {f['peak'] / m['peak']:.2g}x "
            f"(1/{m['peak'] / f['peak']:.0f}), draw rate {f['rate'] / m['rate']:.2g}x, "
            f"build + draws {f['build_s'] + f['draw_s']:.3f} s vs "
            f"{m['build_s'] + m['draw_s']:.3f} s"
        )
    print(
        "\nFeistel memory is per call (a few arrays of batch size), flat in n; the materialised "
        "order is 8n bytes on every rank."
    )


if __name__ == "__main__":
    main()
