"""What the units of a vision LM do at image positions: the query (:class:`~tl_multimodal.analysis.probe.Probe`),
units and hooks, gradient x activation attribution, decoding through the unembedding, ablation, activation
patching, heatmaps over the image, the alignment of image and text tokens, and the same pipeline on a HF VLM's
own processor batch (:mod:`~tl_multimodal.analysis.vlm_neurons`).

May import: ``tl_multimodal.models`` (the protocol) and the private top-level helpers; never views,
evaluation, training, pretrained or the CLI.
"""
