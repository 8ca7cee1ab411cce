#!/usr/bin/env python
"""Drift of a retrained version: cold retrain vs warm start vs L2-to-previous
(paper Sec. 7.2, Table 5 and Figure 4c), on HetRec Last.fm. The experiment
is twhin_jax/drift_experiment.py (``twhin report`` runs it too); this is its
command line. Writes results.json, results.md and drift_by_degree.png into
--out; with --json prints one JSON object per strategy:

  python tools/drift_experiment.py --json                  # ~6.5 min on 2 cores
  python tools/drift_experiment.py --alpha 1 --epochs 10 --dim 64

The dimension defaults to the recipes' one dimension (recipes.DIM).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twhin_jax import drift_experiment  # noqa: E402
from twhin_jax import recipes  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="runs/drift_experiment")
  parser.add_argument("--dim", type=int, default=recipes.DIM)
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--alpha", type=float, default=1.0, help="L2-to-previous strength")
  parser.add_argument("--new-fraction", type=float, default=0.05)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data-dir", help="datasets folder (default: $TWHIN_DATA_DIR)")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  if args.data_dir:
    os.environ["TWHIN_DATA_DIR"] = os.path.abspath(args.data_dir)
  log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else print
  settings = drift_experiment.Settings(dim=args.dim, epochs=args.epochs, alpha=args.alpha,
                                       new_fraction=args.new_fraction, seed=args.seed)
  try:
    drift_experiment.run(args.out, settings, progress=not args.json, log=log,
                         emit=(lambda r: print(json.dumps(r), flush=True)) if args.json else None)
  except FileNotFoundError as err:
    sys.exit(str(err))
  return 0


if __name__ == "__main__":
  sys.exit(main())
