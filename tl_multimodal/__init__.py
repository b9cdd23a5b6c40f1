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
    "analysis.ablation": ["AblationCurve", "AblationResult", "ablate_units", "ablation_curve",
        "sample_matched_units"],
    "analysis.alignment": ["Alignment", "SoftPromptNorms", "alignment", "soft_prompt_norms"],
    "analysis.attribution": ["Attribution", "DatasetAttribution", "TopUnits", "attribute", "attribute_dataset"],
    "analysis.decoding": ["ImagePromptDecoding", "UnitDecoding", "decode_image_prompts", "decode_unit",
        "decode_units", "is_interpretable", "nearest_tokens", "token_texts", "unit_texts"],
    "analysis.heatmaps": ["HeatmapIoUs", "UnitHeatmap", "activation_mask", "heatmap_ious", "mask_iou",
        "plot_heatmap", "unit_grid_activations", "unit_heatmap"],
    "analysis.lens": ["ImageLens", "image_logit_lens"],
    "analysis.nouns": ["first_noun"],
    "analysis.patching": ["PatchResult", "UnitPatchSweep", "get_act_patch_mlp_neuron",
        "get_act_patch_mlp_neuron_over_pos", "patch_resid", "patch_units", "unit_patch_sweep"],
    "analysis.probe": ["Probe", "make_probe", "target_id"],
    "analysis.units": ["as_units"],
    "analysis.vlm_neurons": ["VLMAttribution", "ablate_vlm_units", "attribute_vlm", "chat_inputs", "greedy_answer",
        "patch_vlm_units", "vlm_unit_activations", "vlm_unit_heatmap"],
    "data.coco": ["coco_category_mask", "instance_crops", "load_coco", "object_for_noun"],
    "data.sources": ["ImageReadError", "ImagesByIndex", "SampleImages", "download_coco_sample", "load_coco_mini",
        "open_dataset", "rows_naming_bad_images", "sample_images", "write_coco_sample"],
    "evaluation.config": ["EvalConfig"],
    "evaluation.controls": ["SpecificityControls", "specificity_controls", "unit_magnitudes"],
    "evaluation.decodability": ["Decodability", "decodability_test"],
    "evaluation.lens": ["LensCurve", "lens_similarity", "resid_lens_texts", "unit_lens_texts"],
    "evaluation.neurons": ["AblationSummary", "IoUTest", "NeuronsEval", "SimilarityTest", "coco_object_masks",
        "evaluate_neurons", "heatmap_iou_test", "pair_similarities", "summarize_ablation", "text_similarity_test"],
    "evaluation.selectivity": ["GenericUnits", "UnitSpread", "drop_units", "generic_units", "iou_ceiling", "rerank",
        "unit_spread"],
    "experiments.lm_blocks": ["ViTWithLMBlocks"],
    "models.bridge": ["VisionBridge"],
    "models.encoders": ["HFVisionEncoder", "VisionEncoder"],
    "models.geometry": ["CropGeometry", "grid_to_image", "input_geometry"],
    "models.images": ["to_pil", "to_pixels"],
    "models.prefix": ["HookedVisionPrefix"],
    "models.projection": ["ImageProjection", "ProjectionInfo", "content_id", "projection_id"],
    "models.protocol": ["VisionLM", "soft_prompts"],
    "models.vlm": ["VLMBridge"],
    "models.vlm_geometry": ["ImageTokenGeometry", "image_token_geometry"],
    "pretrained.limber": ["LIMBER_CONFIGS"],
    "pretrained.load": ["load"],
    "pretrained.offline": ["clear_cache", "load_efficientnet_lite0", "load_smollm2"],
    "pretrained.vlms": ["vlm_bridge"],
    "sae.load": ["load_sae", "save_sae"],
    "sae.model": ["SAE", "SAEConfig", "sae_id"],
    "sae.splice": ["model_hook_name"],
    "sae.train": ["ReconstructionStats", "reconstruction_stats", "train_sae"],
    "training.config": ["RunConfig", "TrainingConfig"],
    "training.features": ["encode_images"],
    "training.nll": ["caption_nll", "caption_token_nll"],
    "training.runner": ["RunSummary", "load_rows", "run_attribution"],
    "training.train": ["TrainingResult", "train_projection"],
    "views.atlas": ["Atlas", "unit_table", "write_atlas"],
    "views.browser": ["Chromium", "PageCheck", "find_chromium"],
    "views.figures": ["plot_unit_heatmaps"],
    "views.heatmap_view": ["HeatmapView", "mark_patch", "patch_heatmap_view", "unit_heatmap_view"],
    "views.html": ["HTMLView", "join_views", "save_views"],
    "views.report": ["UnitReport", "build_report", "write_report"],
    "views.tokens": ["TokenActivationsView", "decoded_tokens_view", "token_activations_view", "tokens_html"],
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
