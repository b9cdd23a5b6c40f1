"""tl_multimodal: what do a text-only language model's neurons see?

Images become soft-prompt tokens of a TransformerLens ``HookedTransformer`` (LiMBeR), so every
TransformerLens tool works on them.

The public names below are imported on first use (PEP 562 ``__getattr__``): importing the package, or
``tl_multimodal.cli`` for ``tl-multimodal --help``, does not import torch or TransformerLens.
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "analysis.ablation": ["AblationCurve", "AblationResult", "ablate_units", "ablation_curve"],
    "analysis.alignment": ["Alignment", "SoftPromptNorms", "alignment", "soft_prompt_norms"],
    "analysis.attribution": ["Attribution", "DatasetAttribution", "TopUnits", "attribute", "attribute_dataset"],
    "models.bridge": ["VisionBridge"],
    "data.coco": ["coco_category_mask", "load_coco", "object_for_noun"],
    "evaluation.config": ["EvalConfig"],
    "evaluation.controls": ["SpecificityControls", "specificity_controls"],
    "data.sources": ["SampleImages", "download_coco_sample", "load_coco_mini", "sample_images", "write_coco_sample"],
    "analysis.decoding": ["ImagePromptDecoding", "UnitDecoding", "decode_image_prompts", "decode_unit", "decode_units",
                 "is_interpretable"],
    "models.encoders": ["HFVisionEncoder", "VisionEncoder"],
    "evaluation.neurons": ["AblationSummary", "IoUTest", "NeuronsEval", "SimilarityTest", "evaluate_neurons",
                   "heatmap_iou_test", "summarize_ablation", "text_similarity_test"],
    "models.geometry": ["CropGeometry"],
    "analysis.heatmaps": ["HeatmapIoUs", "UnitHeatmap", "heatmap_ious", "unit_heatmap"],
    "pretrained.limber": ["LIMBER_CONFIGS"],
    "pretrained.load": ["load"],
    "experiments.lm_blocks": ["ViTWithLMBlocks"],
    "pretrained.offline": ["clear_cache", "load_efficientnet_lite0", "load_smollm2"],
    "analysis.nouns": ["first_noun"],
    "analysis.patching": ["PatchResult", "UnitPatchSweep", "patch_resid", "patch_units", "unit_patch_sweep"],
    "models.prefix": ["HookedVisionPrefix"],
    "analysis.probe": ["Probe", "make_probe", "target_id"],
    "models.projection": ["ImageProjection", "ProjectionInfo", "projection_id"],
    "views.report": ["UnitReport", "build_report", "write_report"],
    "training.runner": ["RunSummary", "load_rows", "run_attribution"],
    "training.config": ["RunConfig", "TrainingConfig"],
    "training.features": ["encode_images"],
    "training.nll": ["caption_nll"],
    "training.train": ["TrainingResult", "train_projection"],
    "views.html": ["HTMLView", "save_views"],
    "views.heatmap_view": ["HeatmapView"],
    "views.tokens": ["TokenActivationsView"],
    "models.protocol": ["VisionLM", "soft_prompts"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    """Import the module defining ``name`` on first access and cache the attribute here."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'tl_multimodal' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tl_multimodal.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
