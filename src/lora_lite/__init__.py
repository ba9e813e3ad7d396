"""lora-lite: forward-hook adapters for PyTorch / Hugging Face models, one small file per method.

    import lora_lite as ll
    ll.attach(model, ll.LoRAConfig(r=8, target_names=(r"q_proj$", r"v_proj$")))
    ... train ...
    ll.save(model, "adapter.safetensors");  ll.load(fresh_model, "adapter.safetensors");  ll.detach(model)

Every registered method's config is exported here by name (ll.LoRAConfig, ll.PiSSAConfig, ...): adding a method
file under lora_lite/variants/ is all it takes.
"""

from . import variants as _variants  # noqa: F401  (registers every method)
from .combine import add_weighted
from .config import ALL_LINEAR, AdapterConfig, LowRankConfig, RankConfig
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
from .merge import merge
from .optim import lora_plus_groups
from .peft_format import export_peft, import_peft
from .runtime import Adapter, adapter_names, attach, detach, disabled, per_row, set_active
from .target import find_targets
from .variant import REGISTRY, ParamSpec, register

__version__ = "0.2.0"

__all__ = [
    "ALL_LINEAR", "AdapterConfig", "RankConfig", "LowRankConfig", "ParamSpec", "REGISTRY", "register",
    "find_targets", "Adapter", "attach", "detach", "adapter_names", "set_active", "disabled", "per_row",
    "add_weighted", "save", "load", "merge", "export_peft", "import_peft", "lora_plus_groups",
    "LoraLiteError", "ConfigError", "UnknownVariantError", "TargetError", "UnsupportedLayerError", "CalibrationError",
    "AttachStateError", "CheckpointError", "ConversionError", "DistributedError",
]

__all__ += [method.config.__name__ for method in REGISTRY.values()]


def __getattr__(attr: str):
    """ll.<Method>Config for every registered method, also one registered after this package was imported."""
    for method in REGISTRY.values():
        if method.config.__name__ == attr:
            return method.config
    raise AttributeError(f"module 'lora_lite' has no attribute {attr!r}")
