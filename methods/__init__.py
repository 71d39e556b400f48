"""Built-in methods; importing this package registers them (``cil.list_methods()`` does it on demand)."""

from methods.aper import APER, APERSSF, APERAdapter, APERFinetune, APERVPTDeep, APERVPTShallow
from methods.finetune import Finetune, Joint
from methods.mos import MOS
from methods.simplecil import SimpleCIL

__all__ = [
    "APER",
    "APERSSF",
    "APERAdapter",
    "APERFinetune",
    "APERVPTDeep",
    "APERVPTShallow",
    "Finetune",
    "Joint",
    "MOS",
    "SimpleCIL",
]
