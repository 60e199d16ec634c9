"""The paper's 1-D Gaussian-mixture experiment: ScoreFusion of two auxiliary score models vs training from scratch.

Same as ``python -m diffusers_scorefusion.experiments.gaussian1d``; pass ``--full`` for the whole sweep. Writes
``results/gaussian1d/report.md``, ``results.json`` and figures.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers_scorefusion.experiments.gaussian1d import main

if __name__ == "__main__":
    main(sys.argv[1:])
