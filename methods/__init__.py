"""Built-in methods; importing this package registers them (``cil.list_methods()`` does it on demand)."""

from methods.aper import APER, APERSSF, APERAdapter, APERFinetune, APERVPTDeep, APERVPTShallow
from methods.coda_prompt import CODAPrompt
from methods.codyra import CoDyRA
from methods.dualprompt import DualPrompt
from methods.ease import EASE
from methods.er import ER
from methods.fecam import FeCAM
from methods.finetune import Finetune, Joint
from methods.fpf import FPF, KFPF
from methods.l2p import L2P
from methods.lae import LAE, LAEAdapter, LAELoRA, LAEPrefix
from methods.mos import MOS
from methods.ranpac import RanPAC
from methods.simplecil import SimpleCIL
from methods.slca import SLCA

__all__ = [
    "APER",
    "APERSSF",
    "EASE",
    "ER",
    "FPF",
    "KFPF",
    "L2P",
    "LAE",
    "MOS",
    "SLCA",
    "APERAdapter",
    "APERFinetune",
    "APERVPTDeep",
    "APERVPTShallow",
    "CODAPrompt",
    "CoDyRA",
    "DualPrompt",
    "FeCAM",
    "Finetune",
    "Joint",
    "LAEAdapter",
    "LAELoRA",
    "LAEPrefix",
    "RanPAC",
    "SimpleCIL",
]
