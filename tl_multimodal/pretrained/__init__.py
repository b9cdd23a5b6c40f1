"""Ready models from weights: the offline SmolLM2-135M + EfficientNet-Lite0 model with its shipped
projection, LiMBeR's configurations, LLaVA, LLaVA-NeXT/OneVision, Qwen2.5-VL, Gemma 3 and Idefics3 on the
bridge, and :func:`tl_multimodal.load`, the one door to all of them.

May import: ``tl_multimodal.models`` and the private top-level helpers.
"""
