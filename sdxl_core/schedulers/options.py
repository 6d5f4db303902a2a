"""The from_config overrides a request may give a sampler, checked for type and range before a schedule is built.

A sampler accepts the keys of its `defaults` (its diffusers class's __init__ arguments); a key's type follows
its default where that is a bool or a string, and its range comes from the tables below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sdxl_core.schedulers.base import Sampler, resolve_config
from sdxl_core.schedulers.common import PREDICTION_TYPES, TIMESTEP_SPACINGS

MAX_TRAIN_TIMESTEPS = 10_000  # 10x SDXL's; bounds the tables a schedule computes

# The values a string option may take in this port (the sampler refuses any it cannot reproduce).
CHOICES: dict[str, tuple[str, ...]] = {
    "beta_schedule": ("linear", "scaled_linear"),
    "prediction_type": PREDICTION_TYPES,
    "timestep_spacing": TIMESTEP_SPACINGS,
    "timestep_type": ("discrete", "continuous"),
    "final_sigmas_type": ("zero", "sigma_min"),
    "interpolation_type": ("linear",),
    "algorithm_type": ("dpmsolver++",),
    "solver_type": ("midpoint", "heun", "logrho", "bh1", "bh2"),
    "time_shift_type": ("exponential", "linear"),
}


@dataclass(frozen=True)
class Range:
    """A number in [low, high] (an end in `open` excluded), whole if `integer`; None allowed if `nullable`."""

    low: float
    high: float
    open: str = ""  # "low", "high" or "both"
    integer: bool = False
    nullable: bool = False

    def holds(self, value: float) -> bool:
        above = self.low < value if self.open in ("low", "both") else self.low <= value
        below = value < self.high if self.open in ("high", "both") else value <= self.high
        whole = not self.integer or float(value).is_integer()
        return not math.isnan(value) and above and below and whole  # infinite only where an end is

    def __str__(self) -> str:
        left = "(" if self.open in ("low", "both") else "["
        right = ")" if self.open in ("high", "both") else "]"
        kind = "an integer" if self.integer else "a number"
        return f"{kind} in {left}{self.low}, {self.high}{right}" + (" or null" if self.nullable else "")


RANGES: dict[str, Range] = {
    "num_train_timesteps": Range(1, MAX_TRAIN_TIMESTEPS, integer=True),
    "beta_start": Range(0, 1, open="both"),
    "beta_end": Range(0, 1, open="both"),
    "steps_offset": Range(0, MAX_TRAIN_TIMESTEPS - 1, integer=True),  # and below num_train_timesteps
    "dynamic_thresholding_ratio": Range(0, 1, open="low"),
    "clip_sample_range": Range(0, 1e4, open="low"),
    "sample_max_value": Range(0, 1e4, open="low"),
    "eta": Range(0, 1),
    "sigma_min": Range(0, 1e4, open="low", nullable=True),
    "sigma_max": Range(0, 1e4, open="low", nullable=True),
    "solver_order": Range(1, 3, integer=True),
    "flow_shift": Range(0, 1e4, open="low"),
    "lambda_min_clipped": Range(-math.inf, 0),  # higher would clip away the whole schedule
}
UNSET_ONLY = ("variance_type", "solver_p", "shift_terminal")  # options this port implements only unset (null)


def accepted(sampler: Sampler) -> list[str]:
    """The option names `sampler` accepts: its diffusers class's __init__ arguments."""
    return sorted(sampler.defaults)


def check(sampler: Sampler, options: dict[str, Any], config: dict[str, Any] | None = None,
                  num_inference_steps: int | None = None) -> None:
    """ValueError naming the first option of a request that `sampler` does not accept, or accepts with another
    type or range; then the ranges that span keys, over the model's `config` with the options applied."""
    keys = accepted(sampler)
    for key, value in options.items():
        if key not in sampler.defaults:
            raise ValueError(f"scheduler option {key!r} (= {value!r}) is unknown to scheduler {sampler.name!r}; "
                             f"it accepts {', '.join(keys)}")
        _check_value(key, value, sampler.defaults[key])
    resolved = {**resolve_config(config or {}, sampler.defaults), **options}
    _check_together(resolved, options, num_inference_steps)


def _refuse(key: str, value: Any, wanted: str) -> None:
    raise ValueError(f"scheduler option {key!r} must be {wanted}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_value(key: str, value: Any, default: Any) -> None:
    if key in UNSET_ONLY and value is not None:
        _refuse(key, value, "null (this port implements no other value)")
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            _refuse(key, value, "true or false")
    elif key in CHOICES:
        if value not in CHOICES[key]:
            _refuse(key, value, f"one of {', '.join(CHOICES[key])}")
    elif key in RANGES:
        wanted = RANGES[key]
        if not (value is None and wanted.nullable) and not (_is_number(value) and wanted.holds(value)):
            _refuse(key, value, str(wanted))
    elif key == "trained_betas":
        if value is not None and not (isinstance(value, list) and value and len(value) <= MAX_TRAIN_TIMESTEPS
                                      and all(_is_number(b) and 0 < b < 1 for b in value)):
            _refuse(key, value, f"null or a list of 1 to {MAX_TRAIN_TIMESTEPS} numbers in (0, 1)")
    elif key == "disable_corrector":
        if not (isinstance(value, list) and all(_is_number(i) and float(i).is_integer() and 0 <= i for i in value)):
            _refuse(key, value, "a list of step indexes (integers >= 0)")
    else:  # a default this module has no rule for: keep it a number or string of the default's kind
        if type(value) is not type(default):
            _refuse(key, value, f"of the type of its default {default!r}")


def _check_together(config: dict[str, Any], options: dict[str, Any], num_inference_steps: int | None) -> None:
    """Ranges that span keys, checked over the resolved config when the request set one of them."""
    n = config["num_train_timesteps"]
    if config.get("trained_betas") is not None and len(config["trained_betas"]) != n:
        raise ValueError(f"scheduler option 'trained_betas' must hold num_train_timesteps={n} values, "
                         f"got {len(config['trained_betas'])}")
    if {"beta_start", "beta_end"} & options.keys() and not config["beta_start"] < config["beta_end"]:
        raise ValueError(f"scheduler option 'beta_start' ({config['beta_start']}) must be below "
                         f"'beta_end' ({config['beta_end']})")
    if {"steps_offset", "num_train_timesteps"} & options.keys() and not 0 <= config["steps_offset"] < n:
        raise ValueError(f"scheduler option 'steps_offset' must be in [0, num_train_timesteps={n}), "
                         f"got {config['steps_offset']}")
    low, high = config.get("sigma_min"), config.get("sigma_max")
    if {"sigma_min", "sigma_max"} & options.keys() and low is not None and high is not None and not low < high:
        raise ValueError(f"scheduler option 'sigma_min' ({low}) must be below 'sigma_max' ({high})")
    if num_inference_steps is not None and not 1 <= num_inference_steps <= n:
        raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps={n}], got {num_inference_steps}")
