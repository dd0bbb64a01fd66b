"""Data pipelines: video decoding, annotation lists, sampling, transforms, datasets and loaders."""

from .annotations import read_list, resolve_under_root
from .collate import collate_clips
from .decoding import VideoDecodeError, VideoReader, decord_available, open_video
from .image_dataset import ImageDataset
from .loader import SeededSampler, build_loader
from .transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from .video_dataset import VideoFinetuneDataset, VideoPretrainDataset

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "ImageDataset",
    "SeededSampler",
    "VideoDecodeError",
    "VideoFinetuneDataset",
    "VideoPretrainDataset",
    "VideoReader",
    "build_loader",
    "collate_clips",
    "decord_available",
    "open_video",
    "read_list",
    "resolve_under_root",
]
