"""FlowMatchEulerDiscreteScheduler: Euler steps of a rectified-flow velocity field (SD3, Flux).

A flow model sees x_sigma = (1 - sigma) x_0 + sigma noise and predicts the velocity
v = noise - x_0; one step moves x along v from sigma to the next sigma:
    x_next = x + (sigma_next - sigma) v.
The model's timestep is sigma * num_train_timesteps (so 1000 is pure noise).

The schedule: n sigmas evenly spaced from sigma_max to sigma_min (or given with `sigmas=`),
bent towards the noisy end by
    shift         s' = shift s / (1 + (shift - 1) s)                 (SD3: shift=3.0)
    dynamic mu    s' = e^mu / (e^mu + (1/s - 1))   ("exponential")   (Flux: mu from the image size,
                                                                      `calculate_shift`)
then optionally stretched to end at `shift_terminal`, or respaced (karras / exponential);
a final 0 is appended. Same arithmetic and float32 rounding as diffusers 0.3x-0.4x.

Interface (what a pipeline calls; diffusers' names):
    sched = FlowMatchEulerDiscreteScheduler.from_config(folder_or_dict)
    sched.set_timesteps(n)                        # SD3
    sched.set_timesteps(n, sigmas=np.linspace(1, 1/n, n), mu=calculate_shift(seq_len, ...))  # Flux
    sched.timesteps [n] float32, sched.sigmas [n + 1] float32 (host NumPy)
    sched.step(v, t, x).prev_sample               # x [N, C, H, W] float32 on any device
    image-to-image:
        timesteps = sched.timesteps_for_strength(strength)   # slices, calls set_begin_index
        x = sched.scale_noise(image_latents, timesteps[:1], noise)   # (1 - s) x_0 + s noise
The model's input is never scaled (`scale_model_input` is the identity, init_noise_sigma = 1).
"""
from __future__ import annotations

import math

import numpy as np

from ..device import array_module, to_host
from .schedulers import SchedulerBase, SchedulerOutput, _noise, _timestep_value, _with


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux / SD3.5 dynamic shifting: mu grows linearly with the number of image tokens
    (base_shift at base_seq_len, max_shift at max_seq_len), as their pipelines compute it."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


class FlowMatchEulerDiscreteScheduler(SchedulerBase):
    defaults = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False,
                    shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
                    use_beta_sigmas=False, time_shift_type="exponential", stochastic_sampling=False)
    init_noise_sigma = 1.0
    order = 1

    def __init__(self, **config):
        super().__init__(**config)
        c = self.config
        if c["time_shift_type"] not in ("exponential", "linear"):
            raise ValueError(f"FlowMatchEulerDiscreteScheduler: time_shift_type {c['time_shift_type']!r} "
                             "is not supported (exponential, linear)")
        if c["use_beta_sigmas"]:
            raise ValueError("FlowMatchEulerDiscreteScheduler: use_beta_sigmas is not supported "
                             "(use_karras_sigmas or use_exponential_sigmas are)")
        if c["use_karras_sigmas"] and c["use_exponential_sigmas"]:
            raise ValueError("FlowMatchEulerDiscreteScheduler: only one of use_karras_sigmas and "
                             "use_exponential_sigmas can be set")
        N = c["num_train_timesteps"]
        self.shift = float(c["shift"])
        sig = np.linspace(1, N, N, dtype=np.float32)[::-1] / np.float32(N)     # [N] float32, 1 .. 1/N
        if not c["use_dynamic_shifting"]:
            sig = self._shift(sig)
        self.sigmas = sig.astype(np.float32)
        self.timesteps = self.sigmas * np.float32(N)
        self.sigma_min, self.sigma_max = float(self.sigmas[-1]), float(self.sigmas[0])
        self.step_index = None
        self.begin_index = None

    # ------------------------------------------------------------------ the schedule

    def _shift(self, s):
        k = self.shift
        return k * s / (1 + (k - 1) * s)

    def set_shift(self, shift: float) -> None:
        self.shift = float(shift)

    def set_begin_index(self, begin_index: int = 0) -> None:
        """The step a loop starts at (image-to-image starts part-way down the schedule)."""
        self.begin_index = int(begin_index)

    def time_shift(self, mu: float, sigma: float, t):
        """Resolution-dependent shift of sigmas t (array): exponential e^mu, or linear mu."""
        if self.config["time_shift_type"] == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        return mu / (mu + (1 / t - 1) ** sigma)

    def _stretch_to_terminal(self, t):
        one_minus = 1 - t
        scale = one_minus[-1] / (1 - self.config["shift_terminal"])
        return 1 - one_minus / scale

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None,
                      mu: float | None = None, timesteps=None):
        """n steps from sigma_max to sigma_min, or the given `sigmas` (and/or `timesteps`); `mu` is
        required with use_dynamic_shifting (Flux: mu = calculate_shift(image_seq_len, ...))."""
        c = self.config
        N = c["num_train_timesteps"]
        if c["use_dynamic_shifting"] and mu is None:
            raise ValueError("FlowMatchEulerDiscreteScheduler: use_dynamic_shifting needs mu= in set_timesteps")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError(f"set_timesteps: {len(sigmas)} sigmas and {len(timesteps)} timesteps differ in length")
        if num_inference_steps is None:
            if sigmas is None and timesteps is None:
                raise ValueError("set_timesteps needs num_inference_steps, sigmas or timesteps")
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        else:
            n = self._check_steps(num_inference_steps)
            for name, given in (("sigmas", sigmas), ("timesteps", timesteps)):
                if given is not None and len(given) != n:
                    raise ValueError(f"set_timesteps: {len(given)} {name} given for num_inference_steps={n}")
        n = self.num_inference_steps = int(num_inference_steps)
        if n < 1:
            raise ValueError("set_timesteps: sigmas / timesteps must not be empty")
        given_ts = None if timesteps is None else np.asarray(timesteps, dtype=np.float64).astype(np.float32)
        if sigmas is None:
            ts = given_ts if given_ts is not None else np.linspace(self.sigma_max * N, self.sigma_min * N, n)
            sig = ts / N                                           # float64 (float32 for given timesteps)
        else:
            sig = np.asarray(sigmas, dtype=np.float64).astype(np.float32)
            if sig.ndim != 1:
                raise ValueError(f"set_timesteps: sigmas should be a list of floats, got shape {sig.shape}")
        # 1. shift towards the noisy end: by the image size (mu) or by the fixed `shift`
        sig = self.time_shift(mu, 1.0, sig) if c["use_dynamic_shifting"] else self._shift(sig)
        # 2. optional: end at shift_terminal, or respace between the ends
        if c["shift_terminal"]:
            sig = self._stretch_to_terminal(sig)
        if c["use_karras_sigmas"]:
            lo, hi, rho = float(sig[-1]), float(sig[0]), 7.0
            ramp = np.linspace(0, 1, n)
            sig = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        elif c["use_exponential_sigmas"]:
            sig = np.exp(np.linspace(math.log(float(sig[0])), math.log(float(sig[-1])), n))
        sig = np.asarray(sig).astype(np.float32)
        ts = given_ts if given_ts is not None else sig * np.float32(N)
        # 3. the last step goes to sigma 0 (or 1 when the model counts sigmas the other way)
        if c["invert_sigmas"]:
            sig = (np.float32(1.0) - sig).astype(np.float32)
            ts = sig * np.float32(N)
            sig = np.concatenate([sig, np.ones(1, np.float32)])
        else:
            sig = np.concatenate([sig, np.zeros(1, np.float32)])
        self.timesteps = ts.astype(np.float32)
        self.sigmas = sig.astype(np.float32)
        self.step_index = None
        self.begin_index = None

    def timesteps_for_strength(self, strength: float):
        """Image-to-image: the tail of the schedule that `strength` keeps (1.0 = all of it, like
        text-to-image), as diffusers' SD3/Flux img2img pipelines slice it; sets the begin index.
        Call after set_timesteps. Returns timesteps [k] with k = the steps that will run."""
        if self.num_inference_steps is None:
            raise ValueError("timesteps_for_strength: call set_timesteps first")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength!r}")
        n = self.num_inference_steps
        init = min(n * strength, n)
        t_start = int(max(n - init, 0))                  # < n for any strength > 0: at least one step runs
        self.set_begin_index(t_start * self.order)
        return self.timesteps[t_start * self.order:]

    # ------------------------------------------------------------------ stepping

    def index_for_timestep(self, timestep) -> int:
        """Position of `timestep` in the schedule (the second match if it repeats, like diffusers)."""
        t = _timestep_value(timestep)
        idx = np.nonzero(self.timesteps == np.float32(t))[0]
        if len(idx) == 0:
            raise ValueError(f"timestep {t} is not in this scheduler's timesteps (call set_timesteps first)")
        return int(idx[1] if len(idx) > 1 else idx[0])

    def _init_step_index(self, timestep) -> None:
        self.step_index = self.index_for_timestep(timestep) if self.begin_index is None else self.begin_index

    def scale_noise(self, sample, timestep, noise):
        """Forward process for image-to-image: (1 - sigma) sample + sigma noise at `timestep`
        (scalar or [N]); sample/noise [N, ...] float32."""
        noise = _with(sample, noise)
        if self.begin_index is None:
            ts = np.asarray(to_host(timestep), dtype=np.float32).reshape(-1)    # the schedule is on the host
            idx = [self.index_for_timestep(t) for t in ts]
        else:
            idx = [self.step_index if self.step_index is not None else self.begin_index]
        sig = self.sigmas[idx]                                                   # [k] float32
        if np.all(sig == sig[0]):                                                # one sigma: Python floats
            s = sig[0]
            return noise * float(s) + sample * float(np.float32(1.0) - s)
        if len(sig) != sample.shape[0]:
            raise ValueError(f"scale_noise: {len(sig)} timesteps for a batch of {sample.shape[0]}")
        xp = array_module(sample)
        s = xp.asarray(sig.reshape((-1,) + (1,) * (sample.ndim - 1)))
        return s * noise + (np.float32(1.0) - s) * sample

    def step(self, model_output, timestep, sample, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None, variance_noise=None,
             return_dict=True):
        """x at `timestep` -> x at the next sigma, given the model's velocity `model_output`.
        stochastic_sampling re-noises the x_0 estimate instead (noise from `generator` /
        `variance_noise`). The s_* arguments are accepted and unused, as in diffusers."""
        sample = _with(model_output, sample)
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.step_index + 1 >= len(self.sigmas):
            raise ValueError(f"step: the schedule of {len(self.sigmas) - 1} steps is already done "
                             "(call set_timesteps again)")
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]   # float32
        x0 = sample - float(sigma) * model_output
        if self.config["stochastic_sampling"]:
            noise = _noise(sample.shape, generator, variance_noise, array_module(sample))
            prev = x0 * float(np.float32(1.0) - sigma_next) + noise * float(sigma_next)
        else:
            prev = sample + float(sigma_next - sigma) * model_output    # dt rounded to float32 like torch
        self.step_index += 1
        prev = prev.astype(np.float32, copy=False)
        return SchedulerOutput(prev, x0) if return_dict else (prev,)

