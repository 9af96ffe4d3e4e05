"""Speed of one 4096×4096 / 4096×14336 layer per format and lowering, beside Qwix's serve path.

    python experiments/bench_ops.py            # full: M = 1, 4, 16, 256 on both shapes
    python experiments/bench_ops.py --quick    # 4096×4096, M = 1, 16, 5 rounds

Writes experiments/results/bench_ops.{md,json,png} (same as `jaxquant bench`).
"""

import argparse
from pathlib import Path

from jaxquant.apps import bench

if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--no-qwix", action="store_true")
  parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
  args = parser.parse_args()
  bench.run(args.quick, args.repeats, args.out, qwix=not args.no_qwix)
