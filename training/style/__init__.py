"""Neural style transfer: Gatys et al. (CVPR 2016) pixel optimisation and Johnson et al. (ECCV 2016) fast
feed-forward stylizers, both with VGG19 perceptual losses.

Public API:
    training.style.vgg:        load_vgg19, random_vgg19, VGGFeatures, VGG19_LAYERS, VGGWeightsError
    training.style.losses:     gram_matrix, content_loss, style_loss, tv_loss, blended_grams, total_loss
    training.style.images:     load_image, save_image, transfer_original_colors, rgb_to_yiq, yiq_to_rgb
    training.style.gatys:      GatysConfig, stylize
    training.style.fast_style: TransformerNet, TransformerNetConfig, FastStyleConfig, train_fast_style,
                               load_fast_style, save_fast_style, stylize_fast
"""

from training.style.fast_style import (FastStyleConfig, TransformerNet, TransformerNetConfig, load_fast_style,
                                       save_fast_style, stylize_fast, train_fast_style)
from training.style.gatys import GatysConfig, stylize
from training.style.images import load_image, save_image, transfer_original_colors
from training.style.losses import NonFiniteLossError, content_loss, gram_matrix, style_loss, tv_loss
from training.style.vgg import VGG19_LAYERS, VGGFeatures, VGGWeightsError, load_vgg19, random_vgg19

__all__ = [
    "FastStyleConfig", "GatysConfig", "NonFiniteLossError", "TransformerNet", "TransformerNetConfig",
    "VGG19_LAYERS", "VGGFeatures", "VGGWeightsError", "content_loss", "gram_matrix", "load_fast_style",
    "load_image", "load_vgg19", "random_vgg19", "save_fast_style", "save_image", "style_loss", "stylize",
    "stylize_fast", "train_fast_style", "transfer_original_colors", "tv_loss",
]
