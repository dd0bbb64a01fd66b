"""Models: the tube-patch ViT classifier and the HPM pretraining model (registered with timm)."""

from hpm_video.models.pretrain import HPMPretrainModel, ema_decay
from hpm_video.models.registry import CLASSIFIER_MODELS, MODEL_NAMES, PRETRAIN_MODELS, SIZES, create_model
from hpm_video.models.vit import VisionTransformer

__all__ = [
    "CLASSIFIER_MODELS",
    "MODEL_NAMES",
    "PRETRAIN_MODELS",
    "SIZES",
    "HPMPretrainModel",
    "VisionTransformer",
    "create_model",
    "ema_decay",
]
