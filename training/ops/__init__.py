"""Reference (stock torch) implementations of StyleGAN2's fused ops, with optional compiled CUDA kernels."""

from .bias_act import ACTIVATIONS, bias_act
from .modulated_conv2d import DEMOD_EPS, demod_coefficients, modulated_conv2d, modulated_conv2d_grouped
from .upfirdn2d import downsample2d, filter2d, setup_filter, upfirdn2d, upsample2d

__all__ = [
    "ACTIVATIONS", "DEMOD_EPS", "bias_act", "demod_coefficients", "downsample2d", "filter2d",
    "modulated_conv2d", "modulated_conv2d_grouped", "setup_filter", "upfirdn2d", "upsample2d",
]
