"""Reproductions of the paper's experiments on data bundled with scikit-learn or simulated: digits and 1-D mixtures.

Entry points: ``python -m diffusers_scorefusion.experiments.digits`` and
``python -m diffusers_scorefusion.experiments.gaussian1d``. These modules need the ``demo`` extra (scikit-learn,
matplotlib, scipy); the core package does not import them.
"""
