"""The multimodal-neurons paper's tests on a dataset (decoded-text similarity, the ablation curve, heatmap
IoU with COCO objects), their specificity controls, and COCO masks.

May import: ``tl_multimodal.analysis``, ``tl_multimodal.models`` and the private top-level helpers.
"""
