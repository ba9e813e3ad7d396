"""One file per method. Importing this package registers every variant and its config."""

from .delora import DeLoRA, DeLoRAConfig
from .dora import DoRA, DoRAConfig
from .hra import HRA, HRAConfig
from .ia3 import IA3, IA3Config
from .ia3_ff import IA3FF, IA3FFConfig
from .lora import LoRA, LoRAConfig
from .pissa import PiSSA, PiSSAConfig
from .road import Road, RoadConfig

__all__ = ["DeLoRA", "DeLoRAConfig", "DoRA", "DoRAConfig", "HRA", "HRAConfig", "IA3", "IA3Config", "IA3FF",
           "IA3FFConfig", "LoRA", "LoRAConfig", "PiSSA", "PiSSAConfig", "Road", "RoadConfig"]
