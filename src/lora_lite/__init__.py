"""lora-lite: forward-hook adapters for PyTorch / Hugging Face models, one small file per method.

    import lora_lite as ll
    ll.attach(model, ll.LoRAConfig(r=8, target_names=(r"q_proj$", r"v_proj$")))
    ... train ...
    ll.save(model, "adapter.safetensors");  ll.load(fresh_model, "adapter.safetensors");  ll.detach(model)
"""

from .config import ALL_LINEAR, AdapterConfig
from .errors import (
                     AttachStateError,
                     CalibrationError,
                     CheckpointError,
                     ConfigError,
                     ConversionError,
                     DistributedError,
                     LoraLiteError,
                     TargetError,
                     UnknownVariantError,
                     UnsupportedLayerError,
)
from .io import load, save
from .merge import disabled, merge
from .peft_format import export_peft, import_peft
from .runtime import attach, detach
from .target import find_targets
from .variant import REGISTRY, ParamSpec, Variant, register
from .variants import (
                     AntiPaSTOAblateConfig,
                     AntiPaSTOASVDConfig,
                     AntiPaSTOConfig,
                     AntiPaSTOCorDAConfig,
                     AntiPaSTODPLRConfig,
                     AntiPaSTOGainConfig,
                     DeLoRAConfig,
                     DoRAConfig,
                     EVAConfig,
                     HRAConfig,
                     IA3Config,
                     IA3FFConfig,
                     LoRAConfig,
                     LoRAXSConfig,
                     PiSSAConfig,
                     RoadConfig,
)

__version__ = "0.1.0"

__all__ = [
    "ALL_LINEAR", "AdapterConfig", "ParamSpec", "REGISTRY", "Variant", "register", "find_targets",
    "attach", "detach", "save", "load", "merge", "disabled", "export_peft", "import_peft",
    "LoRAConfig", "PiSSAConfig", "DoRAConfig", "DeLoRAConfig", "IA3Config", "IA3FFConfig", "HRAConfig", "RoadConfig",
    "EVAConfig", "LoRAXSConfig", "AntiPaSTOConfig", "AntiPaSTOGainConfig", "AntiPaSTOAblateConfig",
    "AntiPaSTOCorDAConfig", "AntiPaSTOASVDConfig", "AntiPaSTODPLRConfig",
    "LoraLiteError", "ConfigError", "UnknownVariantError", "TargetError", "UnsupportedLayerError", "CalibrationError",
    "AttachStateError", "CheckpointError", "ConversionError", "DistributedError",
]
