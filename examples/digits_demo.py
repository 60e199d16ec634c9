"""The project's main demo: ScoreFusion vs training from scratch vs fine-tuning on real 8x8 digits.

Same as ``python -m diffusers_scorefusion.experiments.digits``; pass ``--full`` for the whole sweep. Writes
``results/digits/report.md``, ``results.json`` and figures; trained models are cached under ``results/digits/cache``.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers_scorefusion.experiments.digits import main

if __name__ == "__main__":
    main(sys.argv[1:])
