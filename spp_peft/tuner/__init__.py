"""The SPP tuner for PEFT: config, layers and model, split like PEFT's own tuners."""

from .checks import AdapterFileError
from .config import SPP_TARGET_MODULES_MAPPING, SPPConfig
from .layer import Linear, SPPLayer
from .model import SPPModel
from ._registration import register

# Like PEFT's own tuners, the method is registered when its package is imported.
register()

__all__ = ["AdapterFileError", "SPPConfig", "SPPLayer", "Linear", "SPPModel", "SPP_TARGET_MODULES_MAPPING"]
