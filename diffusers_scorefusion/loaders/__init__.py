"""Saving and loading fusions, and resolving members given as modules, folders or Hub ids."""
