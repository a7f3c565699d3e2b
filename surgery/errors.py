"""Exception types. Every error says what is wrong and what the user can do about it."""

from __future__ import annotations


class SurgeryError(Exception):
    """Base class for every error raised by surgery."""


class CaptureError(SurgeryError):
    """The model could not be turned into a graph (tracing or shape propagation failed)."""


class OptionsError(SurgeryError, ValueError):
    """An option names something that does not exist (a criterion, an estimator, an option,
    a module pattern); the message lists what does."""


class BudgetError(SurgeryError, ValueError):
    """The requested sparsity or budget cannot be met or is out of range."""


class CalibrationError(SurgeryError, ValueError):
    """Calibration data is missing, malformed, or produced non-finite activations."""


class PlanError(SurgeryError, ValueError):
    """A pruning plan does not fit the model it is applied to, or is malformed."""


class VerificationError(SurgeryError):
    """The pruned model failed its post-surgery check (forward pass or output shapes)."""


class StorageError(SurgeryError):
    """A saved pruned model cannot be written or read back (missing, truncated or corrupt
    files, or an architecture that cannot be rebuilt)."""


class PluginError(SurgeryError):
    """A plugin raised inside one of its hooks or channel rules; the message names the plugin
    and the hook (the plugin's own exception is chained as ``__cause__``)."""


class LoadError(SurgeryError, ValueError):
    """A model, checkpoint, data set or pruned-model folder could not be resolved."""


class ExportError(SurgeryError):
    """The model could not be exported, or the exported file disagrees with PyTorch."""


class AssetMissing(SurgeryError):
    """A real model or data set is not installed; the message says how to install it."""
