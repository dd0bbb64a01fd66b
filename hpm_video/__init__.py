"""hpm-video: masked video pretraining with Hard Patches Mining."""

from hpm_video import models  # noqa: F401  (registers the timm models)

__version__ = "0.1.0"
