"""FlowMatchEulerDiscreteScheduler vs diffusers: timesteps, sigmas and a whole Euler loop.

Each case is (name, scheduler config, set_timesteps kwargs, img2img strength or None), with the
configs SD3 / SD3.5 / Flux ship (shift 3, dynamic shifting with mu, custom sigmas) and the
options around them. A fake model, v = 0.5 x + table[i], drives both schedulers with the same
inputs. diffusers runs live when importable; otherwise tiny-sd3/reference.npz (written by
tools/make_sd3_fixtures.py from these same cases) stands in for it.
"""
from pathlib import Path

import numpy as np
import pytest

from spark_lab.diffusion.flow_match import FlowMatchEulerDiscreteScheduler, calculate_shift
from spark_lab.diffusion.schedulers import load_scheduler

from .scheduler_cases import inputs

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "diffusion" / "tiny-sd3"
FLUX = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096)       # black-forest-labs/FLUX.1-dev scheduler_config.json
MU_1024 = 0.5 + (1.15 - 0.5) / (4096 - 256) * (1024 - 256)   # calculate_shift(1024), written out


def flux_sigmas(n):
    return np.linspace(1.0, 1 / n, n)                          # what FluxPipeline passes


CASES = [
    ("sd3-shift3", dict(shift=3.0), dict(num_inference_steps=8), None),
    ("plain", {}, dict(num_inference_steps=4), None),
    ("flux-dev-mu-sigmas", FLUX, dict(num_inference_steps=6, sigmas=flux_sigmas(6), mu=MU_1024), None),
    ("flux-schnell-sigmas", dict(shift=1.0), dict(num_inference_steps=4, sigmas=flux_sigmas(4)), None),
    ("dynamic-mu-linspace", FLUX, dict(num_inference_steps=5, mu=0.8), None),
    ("dynamic-linear-shift", dict(FLUX, time_shift_type="linear"), dict(num_inference_steps=5, mu=1.3), None),
    ("shift-terminal", dict(shift=3.0, shift_terminal=0.05), dict(num_inference_steps=7), None),
    ("karras", dict(shift=3.0, use_karras_sigmas=True), dict(num_inference_steps=6), None),
    ("exponential", dict(shift=2.0, use_exponential_sigmas=True), dict(num_inference_steps=5), None),
    ("invert", dict(shift=2.0, invert_sigmas=True), dict(num_inference_steps=4), None),
    ("custom-timesteps", dict(shift=3.0), dict(timesteps=[1000.0, 750.5, 500.0, 120.25]), None),
    ("stochastic", dict(shift=3.0, stochastic_sampling=True), dict(num_inference_steps=5), None),
    ("img2img-sd3", dict(shift=3.0), dict(num_inference_steps=10), 0.6),
    ("img2img-flux", FLUX, dict(num_inference_steps=8, sigmas=flux_sigmas(8), mu=0.9), 0.35),
    ("img2img-full", dict(shift=3.0), dict(num_inference_steps=5), 1.0),
]


def run_loop(sched, case, to_arr, from_arr, strength_slice):
    """(timesteps, sigmas, final sample) as NumPy; img2img cases start from scale_noise of an image."""
    name, _, set_kw, strength = case
    n = len(set_kw.get("timesteps", [])) or set_kw.get("num_inference_steps")
    x, table, noises = inputs(n, seed=3)
    sched.set_timesteps(**set_kw)
    ts_all = np.array([float(t) for t in sched.timesteps], np.float32)
    sig_all = np.array([float(s) for s in sched.sigmas], np.float32)
    timesteps = sched.timesteps
    if strength is not None:
        timesteps = strength_slice(sched, strength)
        x = sched.scale_noise(to_arr(x), timesteps[:1], to_arr(noises[-1]))      # x is "the image" here
    else:
        x = to_arr(x)
    for i, t in enumerate(timesteps):
        v = x * 0.5 + to_arr(table[i])
        x = sched.step(v, t, x, variance_noise=to_arr(noises[i])).prev_sample
    return ts_all, sig_all, from_arr(x)


def diffusers_reference(case):
    """The case through diffusers itself (stochastic noise injected where it draws its own)."""
    import torch
    import diffusers
    from diffusers.schedulers import scheduling_flow_match_euler_discrete as mod

    sched = diffusers.FlowMatchEulerDiscreteScheduler(**case[1])
    pending = []

    class Adapter:
        def __getattr__(self, k):
            return getattr(sched, k)

        def set_timesteps(self, **kw):
            sched.set_timesteps(**{k: (list(v) if k in ("sigmas", "timesteps") else v) for k, v in kw.items()})

        def step(self, v, t, x, variance_noise=None):
            pending[:] = [variance_noise]
            return sched.step(v, t, x)

    def pipeline_slice(s, strength):          # StableDiffusion3Img2ImgPipeline.get_timesteps
        n = sched.num_inference_steps
        init_timestep = min(n * strength, n)
        t_start = int(max(n - init_timestep, 0))
        sched.set_begin_index(t_start * sched.order)
        return sched.timesteps[t_start * sched.order:]

    old = mod.randn_tensor
    mod.randn_tensor = lambda shape, generator=None, device=None, dtype=None, **kw: pending.pop()
    try:
        return run_loop(Adapter(), case, torch.from_numpy, lambda a: a.numpy(), pipeline_slice)
    finally:
        mod.randn_tensor = old


def reference(case):
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        ref = np.load(FIX / "reference.npz")
        name = case[0]
        return ref[f"flow_{name}_ts"], ref[f"flow_{name}_sigmas"], ref[f"flow_{name}_out"]
    return diffusers_reference(case)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_flow_match_matches_diffusers(case):
    ours = run_loop(FlowMatchEulerDiscreteScheduler(**case[1]), case, lambda a: a, lambda a: a,
                    lambda s, strength: s.timesteps_for_strength(strength))
    want = reference(case)
    np.testing.assert_allclose(ours[0], want[0], rtol=1e-6, atol=1e-4)        # timesteps
    np.testing.assert_allclose(ours[1], want[1], rtol=1e-6, atol=1e-7)        # sigmas
    assert ours[2].dtype == np.float32
    np.testing.assert_allclose(ours[2], want[2], rtol=1e-5, atol=1e-5)


def test_calculate_shift_matches_flux_pipeline():
    assert calculate_shift(1024) == pytest.approx(MU_1024, rel=1e-12)
    try:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift as theirs
    except ImportError:
        pytest.skip("diffusers not installed")
    for seq in (256, 1024, 4096, 6000):
        assert calculate_shift(seq, 256, 4096, 0.5, 1.15) == theirs(seq, 256, 4096, 0.5, 1.15)


def test_initial_schedule_and_set_shift():
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert s.timesteps.dtype == np.float32 and len(s.timesteps) == 1000
    assert s.sigma_max == 1.0 and s.sigma_min == pytest.approx(3 * 0.001 / (1 + 2 * 0.001), rel=1e-6)
    assert FlowMatchEulerDiscreteScheduler(**FLUX).sigma_min == pytest.approx(0.001, rel=1e-6)  # unshifted
    s.set_shift(1.0)
    s.set_timesteps(2)
    np.testing.assert_allclose(s.sigmas, [1.0, s.sigma_min, 0.0], rtol=1e-6)


def test_scale_noise_per_sample_timesteps():
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(6)
    rng = np.random.default_rng(0)
    x, noise = rng.standard_normal((2, 2, 3, 3), dtype=np.float32), rng.standard_normal((2, 2, 3, 3), dtype=np.float32)
    out = s.scale_noise(x, s.timesteps[[1, 4]], noise)
    sig = s.sigmas[[1, 4]].reshape(2, 1, 1, 1)
    np.testing.assert_allclose(out, sig * noise + (1 - sig) * x, rtol=1e-6)
    assert out.dtype == np.float32
    np.testing.assert_allclose(s.scale_noise(x, s.timesteps[2], noise), s.sigmas[2] * noise + (1 - s.sigmas[2]) * x,
                               rtol=1e-6)


def test_load_scheduler_finds_flow_match():
    s = load_scheduler(FIX)                                   # tiny-sd3/scheduler/scheduler_config.json
    assert isinstance(s, FlowMatchEulerDiscreteScheduler) and s.config["shift"] == 3.0
    assert isinstance(load_scheduler(FIX.parent / "tiny-sd", "flow-euler"), FlowMatchEulerDiscreteScheduler)


def test_bad_inputs():
    s = FlowMatchEulerDiscreteScheduler(**FLUX)
    with pytest.raises(ValueError, match="mu="):
        s.set_timesteps(4)
    with pytest.raises(ValueError, match="timesteps_for_strength: call set_timesteps first"):
        s.timesteps_for_strength(0.5)
    s.set_timesteps(4, mu=0.7)
    for bad in (0.0, 1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            s.timesteps_for_strength(bad)
    assert len(s.timesteps_for_strength(0.01)) == 1 and s.begin_index == 3     # the last step still runs
    with pytest.raises(ValueError, match="3 sigmas given for num_inference_steps=4"):
        s.set_timesteps(4, sigmas=[1.0, 0.5, 0.2], mu=0.7)
    with pytest.raises(ValueError, match="time_shift_type"):
        FlowMatchEulerDiscreteScheduler(time_shift_type="cosine")
    with pytest.raises(ValueError, match="use_beta_sigmas"):
        FlowMatchEulerDiscreteScheduler(use_beta_sigmas=True)
    s.set_timesteps(4, mu=0.7)                                # forgets the begin index
    with pytest.raises(ValueError, match="not in this scheduler's timesteps"):
        s.step(np.zeros((1, 1), np.float32), 123.0, np.zeros((1, 1), np.float32))
    s.set_timesteps(1, mu=0.7)
    x = np.zeros((1, 1), np.float32)
    s.step(x, s.timesteps[0], x)
    with pytest.raises(ValueError, match="already done"):
        s.step(x, s.timesteps[0], x)


def test_device_arrays_stay_on_the_device():
    """Samples on the device (CuPy, or SPARK_LAB_DEVICE=strict) step there; the schedule stays on the host."""
    from spark_lab.device import to_device, to_host
    rng = np.random.default_rng(1)
    x, v, noise = (rng.standard_normal((1, 2, 4, 4), dtype=np.float32) for _ in range(3))
    results = []
    for move in (lambda a: a, to_device):
        s = FlowMatchEulerDiscreteScheduler(**FLUX)
        s.set_timesteps(4, sigmas=flux_sigmas(4), mu=0.9)
        ts = s.timesteps_for_strength(0.6)
        y = s.scale_noise(move(x), ts[:1], move(noise))
        y = s.step(move(v), ts[0], y).prev_sample
        results.append(to_host(y))
    np.testing.assert_array_equal(results[0], results[1])
    assert results[1].dtype == np.float32
