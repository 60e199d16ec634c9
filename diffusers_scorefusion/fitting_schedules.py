"""Deprecated path of `diffusers_scorefusion.fitting.fitting_schedules` (removed in 0.3.0)."""

from ._deprecated_module import alias_module

alias_module(__name__, "diffusers_scorefusion.fitting.fitting_schedules")
