"""The vision-language models themselves: the :class:`~tl_multimodal.models.protocol.VisionLM` protocol every
analysis talks to, the image front end (images -> pixels -> encoder features -> projection -> soft prompts),
both backends (:class:`~tl_multimodal.models.prefix.HookedVisionPrefix`, a ``HookedTransformer`` on
TransformerLens 3.9; :class:`~tl_multimodal.models.bridge.VisionBridge` on a ``TransformerBridge``), whole HF
VLMs on the bridge (:class:`~tl_multimodal.models.vlm.VLMBridge`) and their image tokens' geometry, vision
encoders, projections, image geometry (which pixels each image token sees) and the fast decode loop.

May import: ``tl_multimodal._validate``, ``tl_multimodal._io``, ``tl_multimodal._compat``; nothing else of
the package.
"""
