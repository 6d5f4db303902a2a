"""Euler, Euler-ancestral, Heun and LMS against their diffusers schedulers, step for step, and the registry."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import (
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
)
from scipy import integrate
from torch.testing import assert_close

from sdxl_core.configs import SDXL_SCHEDULER_CONFIG as SDXL
from sdxl_core.schedulers import SCHEDULERS, make_schedule
from sdxl_core.schedulers.lms import lms_coefficients

TOL = {"atol": 1e-5, "rtol": 0}
SHAPE = (1, 4, 8, 8)
DIFFUSERS = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "lms": LMSDiscreteScheduler,
}

# Overrides of SDXL 1.0's scheduler config (leading, steps_offset 1, scaled_linear, epsilon), and the samplers
# whose diffusers class knows every overridden key.
CONFIGS = {
    "sdxl": ({}, ("euler", "euler_a", "heun", "lms")),
    "trailing": ({"timestep_spacing": "trailing"}, ("euler", "euler_a", "heun", "lms")),
    "linspace": ({"timestep_spacing": "linspace", "beta_schedule": "linear"}, ("euler", "euler_a", "heun", "lms")),
    "karras": ({"use_karras_sigmas": True}, ("euler", "heun", "lms")),
    "v_prediction": ({"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, tuple(DIFFUSERS)),
    "sample": ({"prediction_type": "sample"}, ("euler", "heun", "lms")),
    "karras_v_sigma_bounds": (
        {"use_karras_sigmas": True, "prediction_type": "v_prediction", "sigma_min": 0.1, "sigma_max": 10.0},
        ("euler",),
    ),
    "continuous_v": ({"timestep_type": "continuous", "prediction_type": "v_prediction"}, ("euler",)),
    "final_sigma_min": ({"final_sigmas_type": "sigma_min"}, ("euler",)),
    "heun_clip": ({"clip_sample": True, "clip_sample_range": 0.5, "prediction_type": "sample"}, ("heun",)),
}
CASES = [
    pytest.param(name, key, steps, id=f"{name}-{key}-{steps}")
    for key, (_, names) in CONFIGS.items()
    for name in names
    for steps in ((1, 7, 50) if key == "sdxl" else (7, 30))
]


def fake_model(x, t):
    """A deterministic stand-in for the UNet, nonlinear in x and t."""
    return 0.9 * x + 0.3 * torch.sin(3 * x + t / 150) * torch.cos(t / 100)


def _reference(name, overrides, steps):
    scheduler = DIFFUSERS[name].from_config({**SDXL, **overrides})
    scheduler.set_timesteps(steps)
    return scheduler


def _seeded(seed=3):
    return torch.Generator().manual_seed(seed)


def _run_reference(scheduler, name, x, begin=0, generator=None):
    """diffusers' pipeline loop from timesteps[begin]."""
    scheduler.set_begin_index(begin)
    extra = {"generator": generator} if name in ("euler", "euler_a") else {}
    for t in scheduler.timesteps[begin:]:
        x = scheduler.step(fake_model(scheduler.scale_model_input(x, t), t), t, x, **extra).prev_sample
    return x


def _run_ours(schedule, x, begin=0, generator=None, stop=None):
    sampler, state = schedule.sampler, {}
    for i in range(begin, schedule.num_steps if stop is None else stop):
        model_output = fake_model(sampler.scale_model_input(schedule, x, i), schedule.timesteps[i])
        x = sampler.step(schedule, i, x, model_output, state, generator)
    return x


@pytest.mark.parametrize("name, key, steps", CASES)
def test_schedule_and_sampling_loop_match_diffusers(name, key, steps):
    overrides = CONFIGS[key][0]
    reference = _reference(name, overrides, steps)
    schedule = make_schedule(name, steps, {**SDXL, **overrides})

    assert torch.equal(schedule.timesteps, reference.timesteps)
    assert torch.equal(schedule.sigmas, reference.sigmas)
    assert schedule.init_noise_sigma == reference.init_noise_sigma.item()
    assert schedule.order == reference.order

    noise = torch.randn(SHAPE)
    ours = _run_ours(schedule, noise * schedule.init_noise_sigma, generator=_seeded())
    expected = _run_reference(reference, name, noise * reference.init_noise_sigma, generator=_seeded())
    assert_close(ours, expected, **TOL)


@pytest.mark.parametrize("name", list(DIFFUSERS))
@pytest.mark.parametrize("key", ["sdxl", "trailing"])
def test_img2img_start_mid_schedule_matches_diffusers(name, key):
    """diffusers' img2img at strength 0.6: set_begin_index(t_start * order), add_noise there, loop from there."""
    steps, strength = 20, 0.6
    overrides = CONFIGS[key][0]
    reference = _reference(name, overrides, steps)
    schedule = make_schedule(name, steps, {**SDXL, **overrides})
    begin = (steps - min(int(steps * strength), steps)) * schedule.order
    image_latents, noise = torch.randn(SHAPE), torch.randn(SHAPE)

    reference.set_begin_index(begin)
    start = reference.add_noise(image_latents, noise, reference.timesteps[begin : begin + 1])
    expected = _run_reference(reference, name, start, begin, generator=_seeded())

    x = schedule.sampler.add_noise(schedule, image_latents, noise, begin)
    assert torch.equal(x, start)
    assert_close(_run_ours(schedule, x, begin, generator=_seeded()), expected, **TOL)


def test_euler_steps_half_precision_inputs_in_float32():
    """As diffusers: the step upcasts to float32 and returns model_output's dtype."""
    schedule = make_schedule("euler", 10)
    sample, model_output = torch.randn(SHAPE).half(), torch.randn(SHAPE).half()
    half = schedule.sampler.step(schedule, 3, sample, model_output, {})
    full = schedule.sampler.step(schedule, 3, sample.float(), model_output.float(), {})
    assert half.dtype == torch.float16
    assert torch.equal(half, full.half())


@pytest.mark.parametrize("name", ["euler", "euler_a"])
def test_per_sample_index_equals_separate_calls(name):
    schedule = make_schedule(name, 10)
    sampler, index = schedule.sampler, torch.tensor([2, 7])
    x, model_output, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)

    batched = sampler.step(schedule, index, x, model_output, {}, [_seeded(1), _seeded(2)])
    separate = [sampler.step(schedule, int(i), x[b : b + 1], model_output[b : b + 1], {}, [_seeded(b + 1)])
                for b, i in enumerate(index)]
    assert torch.equal(batched, torch.cat(separate))

    scaled = [sampler.scale_model_input(schedule, x[b : b + 1], int(i)) for b, i in enumerate(index)]
    assert torch.equal(sampler.scale_model_input(schedule, x, index), torch.cat(scaled))
    noised = [sampler.add_noise(schedule, x[b : b + 1], noise[b : b + 1], int(i)) for b, i in enumerate(index)]
    assert torch.equal(sampler.add_noise(schedule, x, noise, index), torch.cat(noised))


@pytest.mark.parametrize("name", ["heun", "lms"])
def test_batch_of_requests_offset_in_lockstep_equals_separate_runs(name):
    """Two img2img requests, one starting 4 indices later, stepped as one batch with a (B,) index and one state."""
    schedule = make_schedule(name, 12)
    sampler, offset = schedule.sampler, 4
    stop = schedule.num_steps - offset
    starts = [sampler.add_noise(schedule, torch.randn(SHAPE), torch.randn(SHAPE), i) for i in (0, offset)]

    x, state = torch.cat(starts), {}
    for i in range(stop):
        index = torch.tensor([i, i + offset])
        t = schedule.timesteps[index].reshape(-1, 1, 1, 1)
        x = sampler.step(schedule, index, x, fake_model(sampler.scale_model_input(schedule, x, index), t), state)

    separate = [_run_ours(schedule, starts[0], stop=stop), _run_ours(schedule, starts[1], begin=offset)]
    assert torch.equal(x, torch.cat(separate))


def test_heun_batch_mixing_first_and_second_stage_equals_separate_steps():
    """Requests at different Heun stages, their states concatenated, step as one batch."""
    schedule = make_schedule("heun", 8)
    sampler, stops = schedule.sampler, (2, 3)  # next index: even (first stage), odd (second stage)
    runs = []
    for stop in stops:
        x, state = torch.randn(SHAPE), {}
        for i in range(stop):
            x = sampler.step(schedule, i, x, fake_model(x, schedule.timesteps[i]), state)
        runs.append((x, state))
    outputs = [torch.randn(SHAPE) for _ in stops]

    separate = [sampler.step(schedule, i, x, out, dict(state)) for i, (x, state), out in zip(stops, runs, outputs)]
    merged = {key: torch.cat([state[key] for _, state in runs]) for key in runs[0][1]}
    batched = sampler.step(schedule, torch.tensor(stops), torch.cat([x for x, _ in runs]), torch.cat(outputs), merged)
    assert torch.equal(batched, torch.cat(separate))


def test_heun_second_stage_without_first_stage_state_is_an_error():
    schedule = make_schedule("heun", 8)
    with pytest.raises(ValueError, match="even index"):
        schedule.sampler.step(schedule, 3, torch.randn(SHAPE), torch.randn(SHAPE), {})


def test_lms_coefficients_integrate_the_lagrange_basis():
    """Closed-form weights against scipy's quadrature of the Lagrange basis polynomials, as diffusers integrates."""
    sigmas = make_schedule("lms", 9).sigmas.numpy()
    table = lms_coefficients(sigmas)
    sigmas = sigmas.astype(np.float64)
    for t in range(len(sigmas) - 1):
        order = min(t + 1, 4)
        for j in range(order):
            node, others = sigmas[t - j], [sigmas[t - k] for k in range(order) if k != j]

            def basis(tau, node=node, others=others):
                return np.prod([(tau - other) / (node - other) for other in others])

            assert table[t, j] == pytest.approx(integrate.quad(basis, sigmas[t], sigmas[t + 1], epsrel=1e-10)[0], rel=1e-9)
        assert not table[t, order:].any()


@pytest.mark.parametrize("name", list(DIFFUSERS))
@pytest.mark.parametrize("config", [None, {"_class_name": "DDIMScheduler", "beta_schedule": "linear", "foo": 1}])
def test_config_resolves_as_diffusers_from_config(name, config):
    """The model's known keys override the class defaults; unknown keys are dropped; None is SDXL 1.0's config."""
    cls = DIFFUSERS[name]
    reference = cls.from_config(SDXL if config is None else config)
    init_keys = inspect.signature(cls.__init__).parameters.keys() - {"self"}
    expected = {k: reference.config[k] for k in init_keys}  # .config also keeps the ignored keys, "hidden"
    assert make_schedule(name, 5, config).config == expected


def test_unknown_scheduler_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown scheduler 'dpm'") as error:
        make_schedule("dpm", 10)
    assert all(name in str(error.value) for name in SCHEDULERS)


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5])
def test_step_count_out_of_range_is_an_error(steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_schedule("euler", steps)


@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("euler", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
        ("lms", {"use_beta_sigmas": True}, "use_beta_sigmas"),
        ("euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
        ("euler_a", {"prediction_type": "sample"}, "prediction_type"),
        ("heun", {"timestep_spacing": "middle"}, "timestep_spacing"),
        ("lms", {"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
        ("euler", {"final_sigmas_type": "one"}, "final_sigmas_type"),
        ("lms", {"num_train_timesteps": 10}, "strictly decreasing"),  # 10 leading steps + offset 1: t = 10, 9, ...
    ],
)
def test_unsupported_config_is_an_error_naming_the_option(name, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(name, 10, {**SDXL, **overrides})
