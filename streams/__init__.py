"""Built-in streams; importing this package registers them (``cil.list_streams()`` does it on demand)."""

from streams import domains, folders, hf, nevis, offline

__all__ = ["domains", "folders", "hf", "nevis", "offline"]
