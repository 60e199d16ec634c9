"""The paper's 1-D Gaussian-mixture experiment: ScoreFusion of two auxiliary score models vs training from scratch,
what the fused sampler really samples, and the Langevin corrector.

Same as ``python -m diffusers_scorefusion.experiments.gaussian1d``: ``--setup paper`` (default; every data set
standardised by its own mean and std, as the reference notebook does) or ``--setup common-scale``; ``--full`` for 5
seeds. Writes ``outputs/gaussian1d/`` (or ``outputs/gaussian1d-common-scale/``; git-ignored): report.md, results.json,
figures; ``--update-results`` writes the committed ``results/gaussian1d/`` instead.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers_scorefusion.experiments.gaussian1d import main

if __name__ == "__main__":
    main(sys.argv[1:])
