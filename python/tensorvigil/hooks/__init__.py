"""Capture hooks: framework-neutral parts here, one module per framework (imported lazily)."""

from .base import Collection, SaveConfig

__all__ = ["Collection", "SaveConfig"]
