"""Prompt templates for StyleGAN-NADA's text directions (Gal et al., "StyleGAN-NADA: CLIP-Guided Domain
Adaptation of Image Generators", SIGGRAPH 2022).

IMAGENET_TEMPLATES are the prompt-engineering templates that Radford et al. published with CLIP for zero-shot
ImageNet (80 of them) without "a photo of many {}." (a plural template that does not fit a domain name),
which leaves the 79 that StyleGAN-NADA averages its text embeddings over. The order is irrelevant: the text
direction is a mean over templates.

PART_TEMPLATES drive the optional patch-level directional loss. The official code uses 15 animal / face part
prompts; these are our own 15, face- and texture-oriented, in the same spirit (one direction per part).
"""

from __future__ import annotations

IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

PART_TEMPLATES: tuple[str, ...] = (
    "the face of a {}.",
    "the eyes of a {}.",
    "the nose of a {}.",
    "the mouth of a {}.",
    "the hair of a {}.",
    "the ears of a {}.",
    "the skin of a {}.",
    "the teeth of a {}.",
    "the head of a {}.",
    "the neck of a {}.",
    "the fur of a {}.",
    "the background of a {}.",
    "the texture of a {}.",
    "a detail of a {}.",
    "a close-up of a {}.",
)


def compose(text: str, templates: tuple[str, ...] = IMAGENET_TEMPLATES) -> list[str]:
    """Fill every template with text: ["a bad photo of a {text}.", ...]."""
    return [t.format(text) for t in templates]
