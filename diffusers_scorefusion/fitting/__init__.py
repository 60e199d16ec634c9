"""Learning the fusion weights from a few target samples: the one-pass exact fit (`fit_weights`), its plumbing, the
noising processes it draws from, and encoding target images through a pipeline."""

from .fitting_encoding import encode_for_fitting, encode_images
from .weight_fitting import METHODS, FitResult, fit_weights

__all__ = ["METHODS", "FitResult", "encode_for_fitting", "encode_images", "fit_weights"]
