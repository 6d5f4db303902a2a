"""DDIM, DPM-Solver++ 2M (and Karras) and UniPC against diffusers' schedulers, step for step.

Each diffusers scheduler is built as a user switching the SDXL pipeline's scheduler builds it:
`XScheduler.from_config(pipe.scheduler.config, **overrides)`; ours comes from make_schedule(name, ...).
"""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from sdxl_core.configs import SDXL_SCHEDULER_CONFIG
from sdxl_core.schedulers import SCHEDULERS, check_options, make_schedule
from sdxl_core.schedulers.ddim import DEFAULTS as DDIM_DEFAULTS
from sdxl_core.schedulers.dpm_solver import DEFAULTS as DPM_DEFAULTS
from sdxl_core.schedulers.unipc import DEFAULTS as UNIPC_DEFAULTS

REFERENCE = {  # name: (diffusers class, from_config overrides the name implies)
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
}
CONFIGS = {
    "sdxl": {},  # leading spacing, steps_offset 1
    "trailing": {"timestep_spacing": "trailing"},
    "linspace": {"timestep_spacing": "linspace"},
    "v_prediction": {"prediction_type": "v_prediction"},
}


def fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Deterministic, timestep-dependent and nonlinear; keeps samples O(1) for every prediction type."""
    return x * (0.95 + 0.05 * torch.cos(t.float() / 100)) + 0.05 * torch.sin(x)


def reference(name: str, changes: dict, steps: int, begin: int | None = 0):
    cls, overrides = REFERENCE[name]
    ref = cls.from_config({**SDXL_SCHEDULER_CONFIG, **changes}, **overrides)
    ref.set_timesteps(steps)
    if begin is not None and hasattr(ref, "set_begin_index"):
        ref.set_begin_index(begin)  # as the SDXL pipelines do
    return ref


def run_reference(ref, x: torch.Tensor, start: int = 0, **step_kwargs) -> torch.Tensor:
    for t in ref.timesteps[start:]:
        x = ref.step(fake_model(ref.scale_model_input(x, t), t), t, x, **step_kwargs).prev_sample
    return x


def run_ours(schedule, x: torch.Tensor, start: int = 0, generator=None) -> torch.Tensor:
    sampler, state = schedule.sampler, {}
    for i in range(start, schedule.num_steps):
        model_output = fake_model(sampler.scale_model_input(schedule, x, i), schedule.timesteps[i])
        x = sampler.step(schedule, i, x, model_output, state, generator)
    return x


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.isfinite(ref).all()
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("steps", [1, 4, 10, 25])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(REFERENCE))
def test_full_loop_matches_diffusers(name, config, steps):
    ref = reference(name, CONFIGS[config], steps)
    schedule = make_schedule(name, steps, {**SDXL_SCHEDULER_CONFIG, **CONFIGS[config]} if CONFIGS[config] else None)
    assert schedule.sampler is SCHEDULERS[name]
    assert torch.equal(schedule.timesteps, ref.timesteps)
    resolved = {k: v for k, v in schedule.config.items() if k != "eta"}  # eta: DDIM's step argument
    assert resolved == {k: ref.config[k] for k in resolved}
    x = torch.randn(2, 4, 8, 8)
    assert_close(run_ours(schedule, x), run_reference(ref, x))


@pytest.mark.parametrize("name", ["dpmpp_2m_karras", "unipc"])
def test_karras_schedule_with_repeated_timesteps_matches_diffusers(name):
    changes = {"use_karras_sigmas": True}
    ref = reference(name, changes, 60)
    schedule = make_schedule(name, 60, {**SDXL_SCHEDULER_CONFIG, **changes})
    assert torch.equal(schedule.timesteps, ref.timesteps)
    assert len(set(ref.timesteps.tolist())) < 60  # rounding repeats the smallest timesteps; steps go by index
    x = torch.randn(2, 4, 8, 8)
    assert_close(run_ours(schedule, x), run_reference(ref, x))


@pytest.mark.parametrize("steps, strength", [(4, 0.5), (10, 0.3), (25, 0.75)])
@pytest.mark.parametrize("config", ["sdxl", "trailing"])
@pytest.mark.parametrize("name", list(REFERENCE))
def test_start_mid_schedule_matches_diffusers_img2img(name, config, steps, strength):
    # StableDiffusionXLImg2ImgPipeline.get_timesteps, then prepare_latents' add_noise at timesteps[t_start]
    t_start = steps - int(steps * strength)
    ref = reference(name, CONFIGS[config], steps, begin=t_start)
    schedule = make_schedule(name, steps, {**SDXL_SCHEDULER_CONFIG, **CONFIGS[config]})
    image_latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ref_x = ref.add_noise(image_latents, noise, ref.timesteps[t_start : t_start + 1].repeat(2))
    x = schedule.sampler.add_noise(schedule, image_latents, noise, t_start)
    assert_close(x, ref_x)
    # a fresh request state: the multistep solvers warm up from first order at t_start, as diffusers
    assert_close(run_ours(schedule, x, start=t_start), run_reference(ref, ref_x, start=t_start))


EXTRA_OPTIONS = [  # options a model's scheduler config may carry, beyond the four configs above
    ("ddim", {"clip_sample": True, "clip_sample_range": 1.5}),
    ("ddim", {"thresholding": True, "sample_max_value": 1.5}),
    ("ddim", {"prediction_type": "sample", "set_alpha_to_one": True}),
    ("dpmpp_2m", {"solver_type": "heun"}),
    ("dpmpp_2m", {"solver_order": 1}),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "lower_order_final": False, "euler_at_final": True}),
    ("dpmpp_2m", {"prediction_type": "sample", "thresholding": True}),
    ("dpmpp_2m", {"lambda_min_clipped": -5.1}),
    ("dpmpp_2m_karras", {"final_sigmas_type": "sigma_min"}),
    ("unipc", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    ("unipc", {"predict_x0": False, "final_sigmas_type": "sigma_min"}),
    ("unipc", {"solver_order": 3}),
    ("unipc", {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"}),
    ("unipc", {"disable_corrector": [0, 2]}),
    ("unipc", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "sigma_min": 0.1, "sigma_max": 10.0}),
    ("unipc", {"prediction_type": "v_prediction", "thresholding": True}),
]


@pytest.mark.parametrize("steps", [5, 20])  # either side of lower_order_final's 15-step threshold
@pytest.mark.parametrize("name, changes", EXTRA_OPTIONS)
def test_options_match_diffusers(name, changes, steps):
    ref = reference(name, changes, steps)
    schedule = make_schedule(name, steps, {**SDXL_SCHEDULER_CONFIG, **changes})
    assert torch.equal(schedule.timesteps, ref.timesteps)
    x = torch.randn(2, 4, 8, 8)
    assert_close(run_ours(schedule, x), run_reference(ref, x))


def test_ddim_eta_draws_noise_as_diffusers():
    ref = reference("ddim", {}, 10)
    schedule = make_schedule("ddim", 10, {**SDXL_SCHEDULER_CONFIG, "eta": 0.5})
    x = torch.randn(2, 4, 8, 8)
    ours = run_ours(schedule, x, generator=torch.Generator().manual_seed(7))
    assert_close(ours, run_reference(ref, x, eta=0.5, generator=torch.Generator().manual_seed(7)))
    assert not torch.allclose(ours, run_ours(make_schedule("ddim", 10), x))


def test_ddim_per_sample_index_equals_separate_calls():
    schedule = make_schedule("ddim", 10, {**SDXL_SCHEDULER_CONFIG, "clip_sample": True})
    sampler, index = schedule.sampler, torch.tensor([0, 4, 9])
    x, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    model_output = fake_model(x, schedule.timesteps[index].reshape(3, 1, 1, 1))
    batched = sampler.step(schedule, index, x, model_output, {})
    noised = sampler.add_noise(schedule, x, noise, index)
    for b, i in enumerate(index.tolist()):
        assert torch.equal(batched[b : b + 1], sampler.step(schedule, i, x[b : b + 1], model_output[b : b + 1], {}))
        assert torch.equal(noised[b : b + 1], sampler.add_noise(schedule, x[b : b + 1], noise[b : b + 1], i))


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_multistep_solvers_take_a_shared_index_tensor(name):
    schedule = make_schedule(name, 6)
    x = torch.randn(2, 4, 8, 8)
    by_int, by_tensor, state_int, state_tensor = x, x, {}, {}
    for i in range(schedule.num_steps):
        out = fake_model(by_int, schedule.timesteps[i])
        by_int = schedule.sampler.step(schedule, i, by_int, out, state_int)
        by_tensor = schedule.sampler.step(schedule, torch.tensor([i, i]), by_tensor, out, state_tensor)
    assert torch.equal(by_int, by_tensor)
    with pytest.raises(ValueError, match="one step index for the whole batch"):
        schedule.sampler.step(schedule, torch.tensor([1, 2]), x, x, {})


def test_defaults_are_the_diffusers_constructors():
    for defaults, cls in [(DDIM_DEFAULTS, DDIMScheduler), (DPM_DEFAULTS, DPMSolverMultistepScheduler),
                          (UNIPC_DEFAULTS, UniPCMultistepScheduler)]:
        ref = {k: v for k, v in cls().config.items() if not k.startswith("_")}
        assert {k: v for k, v in defaults.items() if k != "eta"} == ref


@pytest.mark.parametrize("name, changes, match", [
    ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ("dpmpp_2m", {"solver_order": 3}, "solver_order"),
    ("dpmpp_2m", {"use_lu_lambdas": True}, "use_lu_lambdas"),
    ("unipc", {"solver_type": "bh1"}, "sigma_min"),
    ("ddim", {"timestep_spacing": "karras"}, "timestep_spacing"),
    ("ddim", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
])
def test_refuses_options_it_does_not_reproduce(name, changes, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(name, 10, {**SDXL_SCHEDULER_CONFIG, **changes})


# --- request options: check_options


@pytest.mark.parametrize("name, options, named", [
    ("euler", {"num_train_timesteps": 0}, "num_train_timesteps"),
    ("euler", {"num_train_timesteps": 10**9}, "num_train_timesteps"),
    ("euler", {"beta_start": -0.1}, "beta_start"),
    ("euler", {"beta_start": 0.5}, "beta_start"),  # above SDXL's beta_end
    ("ddim", {"steps_offset": 10**12}, "steps_offset"),
    ("ddim", {"steps_offset": 1000}, "steps_offset"),  # past num_train_timesteps
    ("euler", {"use_karras_sigmas": 1}, "use_karras_sigmas"),
    ("euler", {"timestep_spacing": "karras"}, "timestep_spacing"),
    ("euler", {"eta": 0.5}, "eta"),  # DDIM's, not Euler's
    ("ddim", {"warp": 1}, "warp"),
])
def test_check_options_names_the_key_and_value(name, options, named):
    (key, value), = options.items()
    with pytest.raises(ValueError, match=named) as error:
        check_options(name, options)
    assert repr(value) in str(error.value)


def test_an_unknown_option_lists_the_accepted_ones():
    with pytest.raises(ValueError) as error:
        check_options("lms", {"bogus": True})
    assert all(key in str(error.value) for key in SCHEDULERS["lms"].defaults)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_each_samplers_defaults_pass_check_options(name):
    check_options(name, {k: v for k, v in SCHEDULERS[name].defaults.items()
                         if k not in ("use_karras_sigmas", "trained_betas") or v is not None}, {}, 10)


ODD = st.one_of(st.none(), st.booleans(), st.sampled_from([-1, 0, 1, 2, 999, 1000, 10_000, 10**9, 0.5, 1e-4, 1.5]),
                st.sampled_from(["linear", "leading", "trailing", "v_prediction", "sigma_min", "x"]),
                st.lists(st.sampled_from([0.5, 1e-3, 2]), max_size=3))


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(name=st.sampled_from(sorted(SCHEDULERS)), data=st.data(), steps=st.sampled_from([1, 2, 5, 50, 1000]))
def test_options_that_pass_check_options_build_a_schedule_or_a_value_error(name, data, steps):
    keys = st.sampled_from(sorted(SCHEDULERS[name].defaults))
    options = data.draw(st.dictionaries(keys, ODD, max_size=3))
    try:
        check_options(name, options, SDXL_SCHEDULER_CONFIG, steps)
        schedule = make_schedule(name, steps, {**SDXL_SCHEDULER_CONFIG, **options})
    except ValueError:
        return
    x = torch.ones(1, 4, 2, 2)
    x = schedule.sampler.step(schedule, 0, schedule.sampler.scale_model_input(schedule, x, 0), x, {})
    assert x.shape == (1, 4, 2, 2)
