"""Ready models from weights: the offline SmolLM2-135M + EfficientNet-Lite0 model with its shipped
projection, LiMBeR's configurations, LLaVA, and :func:`tl_multimodal.load`, the one door to all of them.

May import: ``tl_multimodal.models`` and the private top-level helpers.
"""
