"""One file per method. Importing this package registers every variant and its config."""

from .antipasto import AntiPaSTO, AntiPaSTOConfig
from .antipasto_ablate import AntiPaSTOAblate, AntiPaSTOAblateConfig
from .antipasto_asvd import AntiPaSTOASVD, AntiPaSTOASVDConfig
from .antipasto_corda import AntiPaSTOCorDA, AntiPaSTOCorDAConfig
from .antipasto_dplr import AntiPaSTODPLR, AntiPaSTODPLRConfig
from .antipasto_gain import AntiPaSTOGain, AntiPaSTOGainConfig
from .delora import DeLoRA, DeLoRAConfig
from .dora import DoRA, DoRAConfig
from .eva import EVA, EVAConfig
from .hra import HRA, HRAConfig
from .ia3 import IA3, IA3Config
from .ia3_ff import IA3FF, IA3FFConfig
from .lora import LoRA, LoRAConfig
from .lora_xs import LoRAXS, LoRAXSConfig
from .pissa import PiSSA, PiSSAConfig
from .road import Road, RoadConfig

__all__ = ["DeLoRA", "DeLoRAConfig", "DoRA", "DoRAConfig", "HRA", "HRAConfig", "IA3", "IA3Config", "IA3FF",
           "IA3FFConfig", "LoRA", "LoRAConfig", "PiSSA", "PiSSAConfig", "Road", "RoadConfig",
           "EVA", "EVAConfig", "LoRAXS", "LoRAXSConfig", "AntiPaSTO", "AntiPaSTOConfig", "AntiPaSTOGain",
           "AntiPaSTOGainConfig", "AntiPaSTOAblate", "AntiPaSTOAblateConfig", "AntiPaSTOCorDA",
           "AntiPaSTOCorDAConfig", "AntiPaSTOASVD", "AntiPaSTOASVDConfig", "AntiPaSTODPLR", "AntiPaSTODPLRConfig"]
