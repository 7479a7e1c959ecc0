"""Schedulers vs diffusers: timesteps, init_noise_sigma and a whole sampling loop, same inputs.

diffusers runs live when importable; otherwise the committed reference.npz (written by
tools/make_diffusion_fixtures.py from the same cases) stands in for it.
"""
from pathlib import Path

import numpy as np
import pytest

from spark_lab.diffusion.schedulers import (DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler,
                                            FlowMatchEulerDiscreteScheduler, load_scheduler)

from .scheduler_cases import CASES, inputs, run_loop

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "diffusion"
OURS = {c.__name__: c for c in (DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler)}


def diffusers_reference(name, cls_name, config, n, step_kw):
    """Run the case through diffusers itself, injecting our noise where diffusers draws its own."""
    import torch
    import diffusers
    from diffusers.schedulers import scheduling_ddpm, scheduling_euler_discrete

    sched = getattr(diffusers, cls_name)(**config)
    x, table, noises = inputs(n)
    pending = []

    def fake_randn(shape, generator=None, device=None, dtype=None, **kw):
        return pending.pop()

    class Adapter:
        def __getattr__(self, k):
            return getattr(sched, k)

        # FlowMatchEulerDiscreteScheduler has neither: its pipelines use 1.0 and the raw sample
        @property
        def init_noise_sigma(self):
            return getattr(sched, "init_noise_sigma", 1.0)

        def scale_model_input(self, x, t):
            return sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x

        def step(self, eps, t, x, variance_noise=None, **kw):
            if cls_name == "DDIMScheduler":
                return sched.step(eps, t, x, variance_noise=variance_noise, **kw)
            pending[:] = [variance_noise]
            return sched.step(eps, t, x, **kw)

    old = scheduling_ddpm.randn_tensor, scheduling_euler_discrete.randn_tensor
    scheduling_ddpm.randn_tensor = scheduling_euler_discrete.randn_tensor = fake_randn
    try:
        return run_loop(Adapter(), n, x, table, noises, step_kw, torch.from_numpy, lambda a: a.numpy())
    finally:
        scheduling_ddpm.randn_tensor, scheduling_euler_discrete.randn_tensor = old


def reference(case):
    name = case[0]
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        ref = np.load(FIX / "reference.npz")
        return ref[f"sched_{name}_ts"], float(ref[f"sched_{name}_sigma"]), ref[f"sched_{name}_out"]
    return diffusers_reference(*case)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_scheduler_matches_diffusers(case):
    name, cls_name, config, n, step_kw = case
    x, table, noises = inputs(n)
    ts, sigma, out = run_loop(OURS[cls_name](**config), n, x, table, noises, step_kw, lambda a: a, lambda a: a)
    ref_ts, ref_sigma, ref_out = reference(case)
    np.testing.assert_allclose(ts, ref_ts, rtol=1e-6, atol=1e-4)
    assert sigma == pytest.approx(ref_sigma, rel=1e-6)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-4)


def test_from_config_dict_and_folder_and_switching():
    s = DDIMScheduler.from_config(FIX / "tiny-sd")                       # model folder -> scheduler/
    assert s.config["steps_offset"] == 1 and s.config["beta_schedule"] == "scaled_linear"
    e = EulerDiscreteScheduler.from_config(s.config)                    # DDIM config -> Euler, unknown keys dropped
    assert e.config["beta_start"] == 0.00085 and "set_alpha_to_one" not in e.config
    assert isinstance(load_scheduler(FIX / "tiny-pixel"), DDPMScheduler)
    assert isinstance(load_scheduler(FIX / "tiny-pixel", "euler"), EulerDiscreteScheduler)


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDIMScheduler().set_timesteps(0)
    with pytest.raises(ValueError, match="1000 timesteps"):
        DDPMScheduler().set_timesteps(1001)
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPMScheduler(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMScheduler(timestep_spacing="middle").set_timesteps(4)
    with pytest.raises(ValueError, match="unknown scheduler"):
        load_scheduler(FIX / "tiny-pixel", "heun")
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        DDIMScheduler.from_config(FIX / "nowhere")


def test_seeded_ddpm_noise_is_reproducible():
    s = DDPMScheduler()
    s.set_timesteps(5)
    x = np.ones((1, 3, 2, 2), np.float32)
    a = s.step(x * 0.1, s.timesteps[0], x, generator=7).prev_sample
    b = s.step(x * 0.1, s.timesteps[0], x, generator=np.random.default_rng(7)).prev_sample
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32


def test_add_noise_matches_diffusers_for_every_scheduler():
    """add_noise as img2img and training use it: DDPM/DDIM in alpha space, Euler in sigma space."""
    import diffusers
    import torch
    from spark_lab.diffusion import schedulers as S
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 4, 8, 8), dtype=np.float32), rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    for name in ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"):
        ours, ref = getattr(S, name)(), getattr(diffusers, name)()
        ours.set_timesteps(10)
        ref.set_timesteps(10)
        t = ref.timesteps[[2, 6]]
        want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
        got = ours.add_noise(x0, noise, np.asarray(ours.timesteps)[[2, 6]])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
