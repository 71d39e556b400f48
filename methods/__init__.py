"""Built-in methods; importing this package registers them (``cil.list_methods()`` does it on demand)."""

from methods.finetune import Finetune, Joint
from methods.simplecil import SimpleCIL

__all__ = ["Finetune", "Joint", "SimpleCIL"]
