"""One exception family for user errors.

Every message says what was expected, what was found, and how to fix it. Each class also derives from the
builtin exception a caller would naturally catch (ValueError, TypeError, ...), so `except ValueError` keeps
working for code written before this family existed.
"""


class LoraLiteError(Exception):
    """Base class of every error lora-lite raises on bad input."""


class ConfigError(LoraLiteError, ValueError):
    """A config field is unknown, mistyped or out of range (e.g. odd r for HRA, r > min(d_in, d_out))."""


class UnknownVariantError(LoraLiteError, KeyError):
    """The config names a variant that is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class TargetError(LoraLiteError, ValueError):
    """Targeting matched no layer, or matched something that cannot take an adapter."""


class UnsupportedLayerError(LoraLiteError, TypeError):
    """The variant needs a dense nn.Linear weight but the layer is quantized or not an nn.Linear."""


class CalibrationError(LoraLiteError, ValueError):
    """A data-driven init got no calibration data, or too little of it."""


class AttachStateError(LoraLiteError, RuntimeError):
    """attach() on a model that already carries an adapter, or save()/merge() on one that carries none."""


class CheckpointError(LoraLiteError, ValueError):
    """An adapter file is unreadable, malformed, or does not fit the model it is loaded onto."""


class ConversionError(LoraLiteError, ValueError):
    """merge / export_peft / import_peft cannot represent this adapter exactly in the requested form."""


class DistributedError(LoraLiteError, RuntimeError):
    """Ranks disagree (different adapters attached), a batch cannot be sharded evenly, or a launcher env is incomplete."""


class SkippedLayersWarning(UserWarning):
    """all-linear left out layers that cannot take the adapter (they would never run or would crash); the message
    lists them with the reason. Not an error: the rest of the model is adapted."""


class UnsavedParametersWarning(UserWarning):
    """save() found trainable parameters that belong to no adapter (e.g. a head unfrozen by hand): they are not in
    the file, so a reload would differ. Train such modules with the config's modules_to_save instead."""
