"""Sparse autoencoders (SAEs) on a vision LM's hooks, so that their latents are units like MLP neurons: the
:class:`~tl_multimodal.sae.model.SAE` module and its architectures, reading SAELens's saved folders and Gemma
Scope's ``params.npz`` (:func:`~tl_multimodal.sae.load.load_sae`, without SAELens), the splice of an SAE into a
model's forward pass with its error term (:mod:`~tl_multimodal.sae.splice`), and a minimal trainer
(:mod:`~tl_multimodal.sae.train`).

May import: ``tl_multimodal.models`` and the private top-level helpers; nothing else of the package.
"""
