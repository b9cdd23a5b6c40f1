"""tl_multimodal: what do a text-only language model's neurons see?

Images become soft-prompt tokens of a TransformerLens ``HookedTransformer`` (LiMBeR), so every
TransformerLens tool works on them.
"""

from tl_multimodal.encoders import VisionEncoder
from tl_multimodal.prefix import HookedVisionPrefix
from tl_multimodal.projection import ImageProjection, ProjectionInfo

__all__ = ["HookedVisionPrefix", "ImageProjection", "ProjectionInfo", "VisionEncoder"]
