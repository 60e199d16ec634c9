"""The project's main demo: ScoreFusion vs training from scratch, fine-tuning and weight merging on real 8x8 digits.

Same as ``python -m diffusers_scorefusion.experiments.digits``; pass ``--medium`` (5 seeds, n = 8..64, under an hour
on 2 cores) or ``--full``. Writes ``outputs/digits/`` (``outputs/digits-medium/``, ...; git-ignored): report.md,
results.json and figures; trained models are cached under ``outputs/digits/cache``. ``--update-results`` writes the
committed ``results/digits/`` instead.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers_scorefusion.experiments.digits import main

if __name__ == "__main__":
    main(sys.argv[1:])
