"""Scheduler parity cases shared by test_schedulers.py and tools/make_diffusion_fixtures.py.

A case is (name, diffusers class name, config, num_inference_steps, step kwargs). `run_loop`
drives any scheduler with diffusers' calling convention and a fake model, eps = 0.5 x + table[i],
so spark_lab and diffusers see the same inputs; stochastic steps get noise `noises[i]`.
"""
import numpy as np

SHAPE = (2, 3, 4, 4)

CASES = [
    ("ddpm-linear-leading", "DDPMScheduler", {}, 10, {}),
    ("ddpm-cos-trailing-v", "DDPMScheduler", dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing",
                                                  prediction_type="v_prediction"), 7, {}),
    ("ddpm-scaled-linspace-sample-large", "DDPMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                                beta_end=0.012, timestep_spacing="linspace",
                                                                prediction_type="sample", variance_type="fixed_large",
                                                                clip_sample=False), 5, {}),
    ("ddim-sd", "DDIMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                      clip_sample=False, set_alpha_to_one=False, steps_offset=1), 8, {}),
    ("ddim-linear-clip", "DDIMScheduler", {}, 6, {}),
    ("ddim-trailing-v-zsnr", "DDIMScheduler", dict(timestep_spacing="trailing", prediction_type="v_prediction",
                                                   rescale_betas_zero_snr=True, clip_sample=False), 4, {}),
    ("ddim-cos-linspace-eta", "DDIMScheduler", dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace"),
     5, dict(eta=0.7)),
    ("euler-sd", "EulerDiscreteScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
     9, {}),
    ("euler-leading-v", "EulerDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1,
                                                       prediction_type="v_prediction"), 6, {}),
    ("euler-trailing-karras", "EulerDiscreteScheduler", dict(timestep_spacing="trailing", use_karras_sigmas=True), 6, {}),
    ("flow-shift3", "FlowMatchEulerDiscreteScheduler", dict(shift=3.0), 8, {}),
    ("flow-plain", "FlowMatchEulerDiscreteScheduler", {}, 4, {}),
]


def inputs(n_steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    table = rng.standard_normal((n_steps,) + SHAPE, dtype=np.float32) * 0.5
    noises = rng.standard_normal((n_steps,) + SHAPE, dtype=np.float32)
    return x, table, noises


def run_loop(sched, n_steps, x, table, noises, step_kw, to_arr, from_arr):
    """Returns (timesteps, init_noise_sigma, final sample) as NumPy."""
    sched.set_timesteps(n_steps)
    ts = np.array([float(t) for t in sched.timesteps])
    x = to_arr(x) * float(sched.init_noise_sigma)
    for i, t in enumerate(sched.timesteps):
        xin = sched.scale_model_input(x, t)
        eps = xin * 0.5 + to_arr(table[i])
        kw = dict(step_kw)
        kw["variance_noise"] = to_arr(noises[i])
        x = sched.step(eps, t, x, **kw).prev_sample
    return ts, float(sched.init_noise_sigma), from_arr(x)
