"""Text to image on spark_lab's kernels: diffusers-compatible UNets, VAE, schedulers, pipeline."""
from .cli import make_grid
from .pipeline import TextToImagePipeline
from .schedulers import (DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                         SchedulerOutput, load_scheduler)
from .unet_2d import UNet2DModel
from .unet_2d_condition import UNet2DConditionModel
from .vae import AutoencoderKL

__all__ = ["UNet2DConditionModel", "UNet2DModel", "AutoencoderKL", "DDPMScheduler", "DDIMScheduler",
           "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler", "SchedulerOutput", "load_scheduler",
           "TextToImagePipeline", "make_grid"]
