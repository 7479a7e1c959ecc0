"""Text to image on spark_lab's kernels: diffusers-compatible UNets, VAE, schedulers, pipeline."""
from .pipeline import TextToImagePipeline
from .schedulers import (DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                         SchedulerOutput, load_scheduler)
from .unet_2d import UNet2DModel
from .unet_2d_condition import UNet2DConditionModel
from .vae import AutoencoderKL

__all__ = ["UNet2DConditionModel", "UNet2DModel", "AutoencoderKL", "DDPMScheduler", "DDIMScheduler",
           "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler", "SchedulerOutput", "load_scheduler",
           "TextToImagePipeline", "make_grid"]


def make_grid(images, display_size: int = 256, cols: int | None = None):
    """PIL images -> one PIL image: each upscaled (nearest, whole factors) to about display_size, in a grid."""
    from .cli import make_grid as _grid
    return _grid(images, display_size, cols)
