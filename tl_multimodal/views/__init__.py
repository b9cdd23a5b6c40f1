"""What a person looks at: self-contained HTML views (circuitsvis with its bundle inlined, heatmaps),
matplotlib figures, and the one-image report.

May import: ``tl_multimodal.analysis``, ``tl_multimodal.models``, ``tl_multimodal.sae`` and the private top-level
helpers.
"""
