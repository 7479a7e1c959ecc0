"""Noise schedulers with diffusers' names, defaults and arithmetic.

    DDPMScheduler                 ancestral sampling of the trained Markov chain (adds noise each step)
    DDIMScheduler                 deterministic (eta=0) jumps along the same chain, few steps
    EulerDiscreteScheduler        Euler steps of the probability-flow ODE in sigma space (k-diffusion)
    FlowMatchEulerDiscreteScheduler  Euler steps of a rectified-flow velocity field (SD3, Flux;
                                  defined in flow_match.py, registered here)

Each one: `from_config(dict | folder)`, `set_timesteps(n)`, `.timesteps`, `.init_noise_sigma`,
`scale_model_input(sample, t)`, `step(model_output, t, sample, generator=...) -> .prev_sample`.
The schedule (betas, alphas_cumprod, sigmas) is float32 on the host like diffusers' tensors;
per-step coefficients are Python floats so float32 samples stay float32.
Noise comes from `numpy.random.default_rng(seed)` (or a Generator), or `variance_noise=`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..device import array_module, to_host

CONFIG_NAME = "scheduler_config.json"


@dataclass
class SchedulerOutput:
    prev_sample: object                 # x_{t-1}, same shape as the sample
    pred_original_sample: object = None  # the model's current guess of x_0


# ----------------------------------------------------------------------------- schedules

def betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule (squaredcos_cap_v2): beta_i = 1 - abar((i+1)/n) / abar(i/n), capped."""
    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=np.float32)


def make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas=None) -> np.ndarray:
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float32)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    raise ValueError(f"beta_schedule {beta_schedule!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift/scale sqrt(alphas_cumprod) so the last step has zero SNR (Lin et al. 2023)."""
    abar_sqrt = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
    a0, aT = abar_sqrt[0].copy(), abar_sqrt[-1].copy()
    abar_sqrt = (abar_sqrt - aT) * a0 / (a0 - aT)
    abar = abar_sqrt ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (1 - alphas).astype(np.float32)


def spaced_timesteps(spacing: str, n_train: int, n: int, steps_offset: int = 0, dtype=np.int64) -> np.ndarray:
    """diffusers' timestep_spacing: which n of the n_train trained steps to visit, descending."""
    if spacing == "linspace":
        t = np.linspace(0, n_train - 1, n)
        return (t.round() if dtype == np.int64 else t)[::-1].copy().astype(dtype)
    if spacing == "leading":
        ratio = n_train // n
        return ((np.arange(0, n) * ratio).round()[::-1].copy().astype(dtype) + steps_offset).astype(dtype)
    if spacing == "trailing":
        ratio = n_train / n
        return (np.round(np.arange(n_train, 0, -ratio)).astype(dtype) - 1).astype(dtype)
    raise ValueError(f"timestep_spacing {spacing!r} is not supported (leading, trailing, linspace)")


def _noise(shape, generator, variance_noise, xp):
    if variance_noise is not None:
        if tuple(variance_noise.shape) != tuple(shape):
            raise ValueError(f"variance_noise {tuple(variance_noise.shape)} does not match the sample {tuple(shape)}")
        return xp.asarray(variance_noise, dtype=np.float32)
    rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)
    return xp.asarray(rng.standard_normal(shape, dtype=np.float32))


def _with(model_output, sample):
    """`sample` where `model_output` lives: a host sample beside a device prediction (a notebook's
    own loop) moves once, explicitly; the pipeline's device sample is passed through untouched."""
    xp = array_module(model_output)
    if array_module(sample) is xp:
        return sample
    return to_host(sample) if xp is np else xp.asarray(sample)


def _timestep_value(t):
    return t.item() if hasattr(t, "item") else t


class SchedulerBase:
    defaults: dict = {}
    order = 1

    def __init__(self, **config):
        unknown = set(config) - set(self.defaults)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown config keys {sorted(unknown)}")
        self.config = dict(self.defaults, **config)
        self.num_inference_steps = None

    @classmethod
    def from_config(cls, config, **overrides):
        """A dict (e.g. another scheduler's .config) or a folder with scheduler_config.json
        (or its scheduler/ subfolder); keys this scheduler does not know are ignored, like diffusers."""
        if isinstance(config, (str, Path)):
            p = Path(config)
            for cand in (p, p / CONFIG_NAME, p / "scheduler" / CONFIG_NAME):
                if cand.is_file():
                    config = json.loads(cand.read_text())
                    break
            else:
                raise FileNotFoundError(f"no {CONFIG_NAME} at {p} (or {p / 'scheduler'})")
        if not isinstance(config, dict):
            raise ValueError(f"from_config wants a dict or a folder, got {type(config).__name__}")
        kw = {k: v for k, v in dict(config, **overrides).items() if k in cls.defaults}
        return cls(**kw)

    def save_config(self, folder) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / CONFIG_NAME).write_text(json.dumps(dict(self.config, _class_name=type(self).__name__), indent=2))

    def _check_steps(self, n) -> int:
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}")
        if n > self.config["num_train_timesteps"]:
            raise ValueError(f"num_inference_steps {n} is more than the {self.config['num_train_timesteps']} "
                             "timesteps the model was trained with")
        return int(n)

    def scale_model_input(self, sample, timestep=None):
        return sample

    def __len__(self):
        return self.config["num_train_timesteps"]


class _AlphaScheduler(SchedulerBase):
    """Shared by DDPM / DDIM / Euler: betas -> alphas_cumprod."""

    def _init_alphas(self):
        c = self.config
        betas = make_betas(c["num_train_timesteps"], c["beta_start"], c["beta_end"], c["beta_schedule"],
                           c.get("trained_betas"))
        if c.get("rescale_betas_zero_snr"):
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = (1.0 - betas).astype(np.float32)
        self.alphas_cumprod = np.cumprod(self.alphas, dtype=np.float32)
        if c.get("rescale_betas_zero_snr"):
            self.alphas_cumprod[-1] = 2 ** -24   # avoid an infinite sigma at the last step, as diffusers does

    def _x0_and_eps(self, model_output, sample, a_t: float):
        """The x_0 and epsilon implied by the model output, for each prediction_type."""
        b_t = 1.0 - a_t
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return (sample - b_t ** 0.5 * model_output) * (1.0 / a_t ** 0.5), model_output
        if kind == "sample":
            return model_output, (sample - a_t ** 0.5 * model_output) * (1.0 / b_t ** 0.5)
        if kind == "v_prediction":
            return a_t ** 0.5 * sample - b_t ** 0.5 * model_output, a_t ** 0.5 * model_output + b_t ** 0.5 * sample
        raise ValueError(f"prediction_type {kind!r} is not supported (epsilon, sample, v_prediction)")

    def _clip(self, x0):
        c = self.config
        if c.get("thresholding"):
            x0 = self._threshold(x0)
        elif c.get("clip_sample"):
            r = float(c["clip_sample_range"])
            x0 = array_module(x0).clip(x0, -r, r)
        return x0

    def _threshold(self, x0):
        """Dynamic thresholding (Imagen): clamp each sample at its ratio-quantile of |x0|, then rescale."""
        xp = array_module(x0)
        c = self.config
        N = x0.shape[0]
        flat = xp.abs(x0.reshape(N, -1))
        s = xp.quantile(flat, c["dynamic_thresholding_ratio"], axis=1)
        s = xp.clip(s, 1.0, c["sample_max_value"]).astype(np.float32).reshape((N,) + (1,) * (x0.ndim - 1))
        return xp.clip(x0, -s, s) / s

    def add_noise(self, original, noise, timesteps):
        """q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (training and img2img)."""
        t = np.asarray(timesteps).reshape(-1)
        a = self.alphas_cumprod[t].reshape((-1,) + (1,) * (original.ndim - 1))
        xp = array_module(original)
        return xp.asarray(a ** 0.5) * original + xp.asarray((1 - a) ** 0.5) * noise


# ----------------------------------------------------------------------------- DDPM

class DDPMScheduler(_AlphaScheduler):
    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, variance_type="fixed_small", clip_sample=True, prediction_type="epsilon",
                    thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0,
                    sample_max_value=1.0, timestep_spacing="leading", steps_offset=0, rescale_betas_zero_snr=False)
    init_noise_sigma = 1.0

    def __init__(self, **config):
        super().__init__(**config)
        if self.config["variance_type"] not in ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"):
            raise ValueError(f"DDPMScheduler: variance_type {self.config['variance_type']!r} is not supported")
        self._init_alphas()
        self.timesteps = np.arange(self.config["num_train_timesteps"])[::-1].copy()

    def set_timesteps(self, num_inference_steps: int, device=None):
        c = self.config
        self.num_inference_steps = self._check_steps(num_inference_steps)
        self.timesteps = spaced_timesteps(c["timestep_spacing"], c["num_train_timesteps"], self.num_inference_steps,
                                          c["steps_offset"])

    def previous_timestep(self, t: int) -> int:
        if self.num_inference_steps is None:
            return t - 1
        idx = int(np.nonzero(self.timesteps == t)[0][0])
        return int(self.timesteps[idx + 1]) if idx < len(self.timesteps) - 1 else -1

    def _variance(self, t: int, prev_t: int) -> float:
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        beta_t = 1.0 - a_t / a_prev
        var = max((1.0 - a_prev) / (1.0 - a_t) * beta_t, 1e-20)
        kind = self.config["variance_type"]
        if kind == "fixed_small":
            return var ** 0.5
        if kind == "fixed_small_log":
            return math.exp(0.5 * math.log(var))
        if kind == "fixed_large":
            return beta_t ** 0.5
        return math.exp(0.5 * math.log(beta_t))

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True):
        sample = _with(model_output, sample)
        t = int(_timestep_value(timestep))
        prev_t = self.previous_timestep(t)
        # 1. alphas and betas at t and at the previous timestep
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        b_t, b_prev = 1.0 - a_t, 1.0 - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = 1.0 - cur_alpha
        # 2. the model's x_0, clipped
        x0, _ = self._x0_and_eps(model_output, sample, a_t)
        x0 = self._clip(x0)
        # 3. the posterior mean mu(x_t, x_0) (DDPM paper eq. 7)
        prev = (a_prev ** 0.5 * cur_beta / b_t) * x0 + (cur_alpha ** 0.5 * b_prev / b_t) * sample
        # 4. plus noise, except at the last step
        if t > 0:
            xp = array_module(sample)
            prev = prev + self._variance(t, prev_t) * _noise(sample.shape, generator, variance_noise, xp)
        prev = prev.astype(np.float32, copy=False)
        return SchedulerOutput(prev, x0) if return_dict else (prev,)


# ----------------------------------------------------------------------------- DDIM

class DDIMScheduler(_AlphaScheduler):
    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                    prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
                    clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
                    rescale_betas_zero_snr=False)
    init_noise_sigma = 1.0

    def __init__(self, **config):
        super().__init__(**config)
        self._init_alphas()
        self.final_alpha_cumprod = 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])
        self.timesteps = np.arange(self.config["num_train_timesteps"])[::-1].copy()

    def set_timesteps(self, num_inference_steps: int, device=None):
        c = self.config
        self.num_inference_steps = self._check_steps(num_inference_steps)
        self.timesteps = spaced_timesteps(c["timestep_spacing"], c["num_train_timesteps"], self.num_inference_steps,
                                          c["steps_offset"])

    def step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool = False,
             generator=None, variance_noise=None, return_dict=True):
        sample = _with(model_output, sample)
        if self.num_inference_steps is None:
            raise ValueError("DDIMScheduler: call set_timesteps(n) before step()")
        t = int(_timestep_value(timestep))
        # 1. the previous timestep on the inference grid
        prev_t = t - self.config["num_train_timesteps"] // self.num_inference_steps
        # 2. alphas and betas
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        b_t = 1.0 - a_t
        # 3. predicted x_0 and epsilon
        x0, eps = self._x0_and_eps(model_output, sample, a_t)
        # 4. clip x_0
        x0 = self._clip(x0)
        # 5. sigma_t (DDIM paper eq. 16): eta = 0 is deterministic DDIM, eta = 1 is DDPM-like
        variance = ((1.0 - a_prev) / b_t) * (1.0 - a_t / a_prev)
        std = eta * variance ** 0.5
        if use_clipped_model_output:
            eps = (sample - a_t ** 0.5 * x0) * (1.0 / b_t ** 0.5)
        # 6. direction pointing to x_t, then x_{t-1} (eq. 12)
        prev = a_prev ** 0.5 * x0 + (1.0 - a_prev - std ** 2) ** 0.5 * eps
        if eta > 0:
            prev = prev + std * _noise(sample.shape, generator, variance_noise, array_module(sample))
        prev = prev.astype(np.float32, copy=False)
        return SchedulerOutput(prev, x0) if return_dict else (prev,)


# ----------------------------------------------------------------------------- Euler (sigma space)

class _SigmaStepper:
    """Step-index bookkeeping shared by the sigma-space schedulers."""

    def _index_for(self, timestep) -> int:
        t = _timestep_value(timestep)
        idx = np.nonzero(self.timesteps == np.float32(t))[0]
        if len(idx) == 0:
            raise ValueError(f"timestep {t} is not in this scheduler's timesteps (call set_timesteps first)")
        return int(idx[1] if len(idx) > 1 else idx[0])

    def _ensure_index(self, timestep):
        if self.step_index is None:
            self.step_index = self._index_for(timestep)


class EulerDiscreteScheduler(_AlphaScheduler, _SigmaStepper):
    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, prediction_type="epsilon", interpolation_type="linear",
                    use_karras_sigmas=False, sigma_min=None, sigma_max=None, timestep_spacing="linspace",
                    timestep_type="discrete", steps_offset=0, rescale_betas_zero_snr=False,
                    final_sigmas_type="zero")

    def __init__(self, **config):
        super().__init__(**config)
        self._init_alphas()
        n = self.config["num_train_timesteps"]
        sig = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.sigmas = np.concatenate([sig, [0.0]]).astype(np.float32)
        self.timesteps = np.linspace(0, n - 1, n, dtype=np.float32)[::-1].copy()
        self.step_index = None

    @property
    def init_noise_sigma(self) -> float:
        m = float(self.sigmas.max())
        return m if self.config["timestep_spacing"] in ("linspace", "trailing") else (m * m + 1) ** 0.5

    def set_timesteps(self, num_inference_steps: int, device=None):
        c = self.config
        n = self.num_inference_steps = self._check_steps(num_inference_steps)
        N = c["num_train_timesteps"]
        if c["timestep_spacing"] == "linspace":
            ts = np.linspace(0, N - 1, n, dtype=np.float32)[::-1].copy()
        else:
            ts = spaced_timesteps(c["timestep_spacing"], N, n, c["steps_offset"], np.float32)
        sig = np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)
        log_sig = np.log(sig)
        if c["interpolation_type"] == "linear":
            sigmas = np.interp(ts, np.arange(0, len(sig)), sig)
        elif c["interpolation_type"] == "log_linear":
            sigmas = np.exp(np.linspace(np.log(sig[-1]), np.log(sig[0]), n + 1, dtype=np.float32))
        else:
            raise ValueError(f"interpolation_type {c['interpolation_type']!r} is not supported (linear, log_linear)")
        if c["use_karras_sigmas"]:
            sigmas = self._karras(sigmas, n)
            ts = np.array([self._sigma_to_t(s, log_sig) for s in sigmas])
        if c["final_sigmas_type"] == "sigma_min":
            last = float(sig[0])
        elif c["final_sigmas_type"] == "zero":
            last = 0.0
        else:
            raise ValueError(f"final_sigmas_type {c['final_sigmas_type']!r} is not supported (zero, sigma_min)")
        if c["timestep_type"] != "discrete":
            raise ValueError(f"timestep_type {c['timestep_type']!r} is not supported (discrete)")
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.timesteps = ts.astype(np.float32)
        self.step_index = None

    def _karras(self, sigmas, n):
        """Karras et al. (2022) rho=7 spacing between sigma_min and sigma_max."""
        lo = self.config["sigma_min"] if self.config["sigma_min"] is not None else float(sigmas[-1])
        hi = self.config["sigma_max"] if self.config["sigma_max"] is not None else float(sigmas[0])
        rho = 7.0
        ramp = np.linspace(0, 1, n)
        return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho

    @staticmethod
    def _sigma_to_t(sigma, log_sigmas):
        """Invert the sigma table by piecewise-linear interpolation in log sigma."""
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        d = log_sigma - log_sigmas[:, None]
        lo = np.cumsum((d >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
        w = np.clip((log_sigmas[lo] - log_sigma) / (log_sigmas[lo] - log_sigmas[lo + 1]), 0, 1)
        return ((1 - w) * lo + w * (lo + 1)).reshape(np.shape(sigma))

    def add_noise(self, original, noise, timesteps):
        """x_0 + sigma_t noise, sigma_t of each timestep in the current schedule (Euler works in
        sigma space: not the DDPM q(x_t | x_0) of the alpha schedulers)."""
        sig = np.array([self.sigmas[self._index_for(t)] for t in np.asarray(timesteps).reshape(-1)], np.float32)
        xp = array_module(original)
        return original + xp.asarray(sig.reshape((-1,) + (1,) * (original.ndim - 1))) * noise

    def scale_model_input(self, sample, timestep=None):
        """x / sqrt(sigma^2 + 1): the UNet was trained on unit-variance inputs."""
        self._ensure_index(timestep)
        sigma = float(self.sigmas[self.step_index])
        return sample * (1.0 / (sigma * sigma + 1.0) ** 0.5)

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, variance_noise=None,
             return_dict=True):
        sample = _with(model_output, sample)
        self._ensure_index(timestep)
        sigma = float(self.sigmas[self.step_index])
        # 1. optional churn: raise the noise level to sigma_hat first
        gamma = min(s_churn / (len(self.sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            eps = _noise(sample.shape, generator, variance_noise, array_module(sample)) * s_noise
            sample = sample + eps * (sigma_hat ** 2 - sigma ** 2) ** 0.5
        # 2. the denoised estimate x_0
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            x0 = sample - sigma_hat * model_output
        elif kind == "v_prediction":
            x0 = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample * (1.0 / (sigma ** 2 + 1))
        elif kind in ("sample", "original_sample"):
            x0 = model_output
        else:
            raise ValueError(f"prediction_type {kind!r} is not supported (epsilon, v_prediction, sample)")
        # 3. one Euler step of dx/dsigma = (x - x_0) / sigma
        d = (sample - x0) * (1.0 / sigma_hat)
        dt = float(self.sigmas[self.step_index + 1]) - sigma_hat
        prev = (sample + d * dt).astype(np.float32, copy=False)
        self.step_index += 1
        return SchedulerOutput(prev, x0) if return_dict else (prev,)


# ----------------------------------------------------------------------------- flow matching

# FlowMatchEulerDiscreteScheduler (SD3, Flux) lives in flow_match.py and builds on SchedulerBase
# above; imported here, after the base classes, so load_scheduler and old imports find it.
from .flow_match import FlowMatchEulerDiscreteScheduler  # noqa: E402


SCHEDULERS = {
    "ddpm": DDPMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
    "flow-euler": FlowMatchEulerDiscreteScheduler,
}
BY_CLASS_NAME = {cls.__name__: cls for cls in SCHEDULERS.values()}


def load_scheduler(folder, name: str | None = None):
    """A model's scheduler/ folder -> its scheduler, or `name` (ddpm, ddim, euler, flow-euler) with that config."""
    p = Path(folder)
    cfg_path = p / CONFIG_NAME if (p / CONFIG_NAME).is_file() else p / "scheduler" / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"missing scheduler config: {cfg_path}")
    cfg = json.loads(cfg_path.read_text())
    if name is not None:
        key = name.lower().replace("_", "-")
        cls = SCHEDULERS.get(key) or BY_CLASS_NAME.get(name)
        if cls is None:
            raise ValueError(f"unknown scheduler {name!r} (choose from {', '.join(SCHEDULERS)})")
    else:
        cls = BY_CLASS_NAME.get(cfg.get("_class_name", ""))
        if cls is None:
            raise ValueError(f"scheduler class {cfg.get('_class_name')!r} in {cfg_path} is not supported "
                             f"(supported: {', '.join(BY_CLASS_NAME)})")
    return cls.from_config(cfg)
