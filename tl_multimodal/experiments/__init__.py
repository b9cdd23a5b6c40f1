"""Experiments from the papers that are not part of the core toolkit: frozen LM blocks as visual encoder
layers (:class:`~tl_multimodal.experiments.lm_blocks.ViTWithLMBlocks`).

May import: ``tl_multimodal.models`` and the private top-level helpers.
"""
