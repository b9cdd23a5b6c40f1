"""tl_multimodal: what do a text-only language model's neurons see?

Images become soft-prompt tokens of a TransformerLens ``HookedTransformer`` (LiMBeR), so every
TransformerLens tool works on them.
"""

from tl_multimodal.data import load_coco_mini
from tl_multimodal.encoders import VisionEncoder
from tl_multimodal.lm_blocks import ViTWithLMBlocks
from tl_multimodal.loading import load_efficientnet_lite0, load_offline, load_smollm2
from tl_multimodal.prefix import HookedVisionPrefix
from tl_multimodal.projection import ImageProjection, ProjectionInfo
from tl_multimodal.training import TrainingResult, caption_nll, encode_images, train_projection

__all__ = [
    "HookedVisionPrefix", "ImageProjection", "ProjectionInfo", "TrainingResult", "ViTWithLMBlocks",
    "VisionEncoder", "caption_nll", "encode_images", "load_coco_mini", "load_efficientnet_lite0",
    "load_offline", "load_smollm2", "train_projection",
]
