"""Text to image on spark_lab's kernels: diffusers-compatible UNets, MMDiT transformers (SD3, Flux),
VAE, schedulers, pipelines."""
from .cli import make_grid
from . import image_inputs
from .lora import LoRAWeights
from .pipeline import TextToImagePipeline, load_pipeline
from .schedulers import (DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                         SchedulerOutput, load_scheduler)
from .flow_match import calculate_shift                  # after .schedulers (flow_match imports its base classes)
from .flux import FluxConfig, FluxTransformer2DModel, latent_image_ids, pack_latents, unpack_latents
from .flux_gguf import load_flux_gguf
from .sd3_gguf import load_sd3_gguf
from .sd3 import SD3Transformer2DModel
from .sdxl import StableDiffusionXLPipeline
from .pipeline_flux import FluxPipeline
from .pipeline_sd3 import StableDiffusion3Pipeline
from .unet_2d import UNet2DModel
from .unet_2d_condition import UNet2DConditionModel
from .vae import AutoencoderKL

__all__ = ["UNet2DConditionModel", "UNet2DModel", "AutoencoderKL", "DDPMScheduler", "DDIMScheduler",
           "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler", "SchedulerOutput", "load_scheduler",
           "calculate_shift", "SD3Transformer2DModel", "load_sd3_gguf", "FluxTransformer2DModel", "FluxConfig", "load_flux_gguf",
           "pack_latents", "unpack_latents", "latent_image_ids", "TextToImagePipeline", "StableDiffusionXLPipeline",
           "StableDiffusion3Pipeline", "FluxPipeline",
           "load_pipeline", "LoRAWeights", "image_inputs", "make_grid"]
