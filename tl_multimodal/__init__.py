"""tl_multimodal: what do a text-only language model's neurons see?

Images become soft-prompt tokens of a TransformerLens ``HookedTransformer`` (LiMBeR), so every
TransformerLens tool works on them.
"""

from tl_multimodal.attribution import Attribution, TopUnits, attribute, attribute_dataset, first_noun
from tl_multimodal.bridge import VisionBridge, load_offline_bridge
from tl_multimodal.data import load_coco_mini
from tl_multimodal.decoding import UnitDecoding, decode_image_prompts, decode_unit, decode_units, is_interpretable
from tl_multimodal.encoders import VisionEncoder
from tl_multimodal.heatmaps import coco_category_mask, heatmap_ious, unit_heatmap
from tl_multimodal.lm_blocks import ViTWithLMBlocks
from tl_multimodal.loading import load_efficientnet_lite0, load_offline, load_smollm2
from tl_multimodal.patching import ablate_units, ablation_curve, patch_resid, patch_units, unit_patch_sweep
from tl_multimodal.prefix import HookedVisionPrefix
from tl_multimodal.projection import ImageProjection, ProjectionInfo
from tl_multimodal.report import UnitReport, build_report, write_report
from tl_multimodal.training import TrainingResult, caption_nll, encode_images, train_projection

__all__ = [
    "Attribution", "TopUnits", "UnitDecoding", "attribute", "attribute_dataset", "decode_image_prompts",
    "decode_unit", "decode_units", "first_noun", "is_interpretable",
    "ablate_units", "ablation_curve", "patch_resid", "patch_units", "unit_patch_sweep",
    "coco_category_mask", "heatmap_ious", "unit_heatmap",
    "HookedVisionPrefix", "ImageProjection", "ProjectionInfo", "TrainingResult", "ViTWithLMBlocks",
    "VisionBridge", "VisionEncoder", "caption_nll", "encode_images", "load_coco_mini", "load_efficientnet_lite0",
    "load_offline", "load_offline_bridge", "load_smollm2", "train_projection", "UnitReport", "build_report", "write_report",
]
