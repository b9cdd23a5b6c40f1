"""Making and running at scale: training the projection (LiMBeR), its data and augmentation, several
processes, and the Parquet dataset runner behind ``tl-multimodal attribute``.

May import: ``tl_multimodal.models``, ``tl_multimodal.pretrained``, ``tl_multimodal.analysis`` and the private
top-level helpers.
"""
