"""DPO with the base model as reference, computed on the policy itself through lora_lite.disabled.

    class DPO(ll.hf.BaseAsReference, ll.hf.AdapterCheckpoints, trl.DPOTrainer): ...
    DPO(model=model, args=trl.DPOConfig(precompute_ref_log_probs=True, ...), train_dataset=..., processing_class=tok)

TRL keeps no reference model for PEFT models (it disables the adapter); for any other model it loads a second copy
from `config._name_or_path`. This mixin gives a lora-lite model PEFT's treatment: TRL's reference pass
(`compute_ref_log_probs`) runs inside `lora_lite.disabled(model)`, which is the exact base, and no second model
is built or held. TRL runs that pass once over the datasets before training (precompute_ref_log_probs=True, which
the mixin requires): its per-step reference forward would run between the policy's forward and backward, where a
method that rewrites W (PiSSA, the SVD-basis family) cannot switch W back without invalidating the saved W_res.

The reference is the base: right for a freshly attached adapter (every method starts as the identity). To run DPO
after SFT with the SFT model as reference, lora_lite.merge the SFT adapter into the base and attach a new one.
"""

from __future__ import annotations

from ..distributed import unwrap
from ..errors import ConfigError
from ..runtime import disabled


class BaseAsReference:
    """Mixin for TRL's DPOTrainer: reference log-probs from the policy with every adapter off."""

    def __init__(self, model, ref_model=None, args=None, *rest, **kwargs):
        if ref_model is not None:
            raise ConfigError("BaseAsReference computes the reference from the policy's base (lora_lite.disabled); "
                              "drop ref_model=, or drop the mixin to use that model as the reference")
        if args is None or not getattr(args, "precompute_ref_log_probs", False):
            raise ConfigError("BaseAsReference needs DPOConfig(precompute_ref_log_probs=True): the reference pass then "
                              "runs once, through lora_lite.disabled. Without it TRL loads a second copy of the model "
                              "from config._name_or_path as the reference")
        super().__init__(model, None, args, *rest, **kwargs)

    def compute_ref_log_probs(self, model, inputs):
        with disabled(unwrap(model)):
            return super().compute_ref_log_probs(model, inputs)
