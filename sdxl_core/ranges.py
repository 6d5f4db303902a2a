"""Which steps of a schedule a run covers: `denoising_end`, `denoising_start` and `strength`.

Each returns an index into `schedule.timesteps`, so a run is `denoise(..., start, end)`.
Follows diffusers 0.42.1 pipelines/stable_diffusion_xl: the `denoising_end` cut of
pipeline_stable_diffusion_xl.py, and `get_timesteps` of pipeline_stable_diffusion_xl_img2img.py.
"""

from __future__ import annotations

from sdxl_core.schedulers.base import Schedule


def check_fraction(name: str, value: float | None) -> None:
    """`denoising_start` / `denoising_end` are fractions of the schedule strictly inside (0, 1)."""
    if value is not None and not (isinstance(value, (int, float)) and 0 < value < 1):
        raise ValueError(f"`{name}` must be a float in (0, 1), got {value!r}")


def check_strength(strength: float) -> None:
    if not (isinstance(strength, (int, float)) and 0 < strength <= 1):
        raise ValueError(f"`strength` must be in (0, 1], got {strength!r}")


def timestep_cutoff(schedule: Schedule, fraction: float) -> int:
    """The training timestep a fraction of the way through denoising: 0.8 of 1000 -> 200."""
    n = schedule.config["num_train_timesteps"]
    return round(n - fraction * n)


def end_index(schedule: Schedule, denoising_end: float | None, start: int = 0) -> int:
    """Stop before the first timestep below the cutoff; keeps timesteps >= cutoff after `start`."""
    if denoising_end is None:
        return schedule.num_steps
    check_fraction("denoising_end", denoising_end)
    cutoff = timestep_cutoff(schedule, denoising_end)
    return start + int((schedule.timesteps[start:] >= cutoff).sum())


def start_index(schedule: Schedule, denoising_start: float) -> int:
    """Start at the timesteps below the cutoff, never between the two halves of a 2nd-order step."""
    check_fraction("denoising_start", denoising_start)
    n = int((schedule.timesteps < timestep_cutoff(schedule, denoising_start)).sum())
    if schedule.order == 2 and n % 2 == 0:
        n += 1  # every timestep but the first is doubled (Heun): an odd count ends on a full step
    return schedule.num_steps - n


def strength_start_index(schedule: Schedule, num_inference_steps: int, strength: float) -> int:
    """img2img without `denoising_start`: run the last `int(steps * strength)` steps."""
    check_strength(strength)
    init_steps = min(int(num_inference_steps * strength), num_inference_steps)
    if init_steps < 1:
        raise ValueError(
            f"`strength` {strength!r} with num_inference_steps={num_inference_steps} leaves no step to run; "
            f"raise either so that int(num_inference_steps * strength) >= 1"
        )
    return (num_inference_steps - init_steps) * schedule.order


def check_start_before_end(denoising_start: float | None, denoising_end: float | None) -> None:
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise ValueError(
            f"`denoising_start` ({denoising_start!r}) must be below `denoising_end` ({denoising_end!r})"
        )


def check_range(strength: float | None, denoising_start: float | None, denoising_end: float | None) -> None:
    """The img2img / inpaint range arguments: each in range, and the start before the end."""
    if strength is not None:
        check_strength(strength)
    check_fraction("denoising_start", denoising_start)
    check_fraction("denoising_end", denoising_end)
    check_start_before_end(denoising_start, denoising_end)
