"""GAN finetuning of a pretrained StyleGAN2 on an image folder (StyleGAN2 losses, lazy R1 / path length, EMA,
Freeze-D, ADA-style augmentation): the step before network blending."""

from .augment import AdaController, AugmentPipe
from .dataset import ImageFolderDataset, list_image_files, load_image
from .losses import PathLengthRegularizer, d_logistic_loss, g_nonsaturating_loss, r1_loss, r1_penalty
from .trainer import (FinetuneConfig, FinetuneRun, ema_beta, freeze_discriminator, read_config, step_seed,
                      update_ema, write_config)

__all__ = ["AdaController", "AugmentPipe", "FinetuneConfig", "FinetuneRun", "ImageFolderDataset",
           "PathLengthRegularizer", "d_logistic_loss", "ema_beta", "freeze_discriminator", "g_nonsaturating_loss",
           "list_image_files", "load_image", "r1_loss", "r1_penalty", "read_config", "step_seed", "update_ema",
           "write_config"]
