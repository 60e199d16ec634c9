"""Old import paths that keep working for one release, with a `FutureWarning` as Diffusers' `deprecate` gives."""

import importlib
import sys
import warnings
from types import ModuleType

REMOVED_IN = "0.3.0"


def alias_module(old_name: str, new_name: str) -> ModuleType:
    """Makes `old_name` the module `new_name` (same object, so patches and attributes agree) and warns once."""
    warnings.warn(
        f"`{old_name}` is deprecated and will be removed in version {REMOVED_IN}; import from `{new_name}` instead.",
        FutureWarning,
        stacklevel=3,
    )
    module = importlib.import_module(new_name)
    sys.modules[old_name] = module
    return module
