"""Did spectral normalization take? The measured largest singular value σ of each Linear layer at a trial's last
epoch, per arm: spectrally normalized layers sit at σ ≈ 1, unconstrained ones drift above it. The product of a
trial's σ is an upper bound on the MLP's Lipschitz constant (ReLU and dropout at eval are 1-Lipschitz)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import numpy as np

# A wrapped layer measured above this is not normalized (torch's one power iteration per step and our measurement
# leave a few per mille either way; 5% is far beyond that).
SN_TOLERANCE = 1.05


def _layer_order(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def wrapped_layers(sigmas: dict[str, float], hyperparams: dict | None) -> list[str]:
    """The layers a spectral-norm trial wraps: every Linear, but the output (last) layer when the trial says
    `sn_output_layer: false`."""
    if (hyperparams or {}).get("sn_output_layer") is False:
        return sorted(sigmas, key=_layer_order)[:-1]
    return list(sigmas)


def _spread(values: Sequence[float]) -> dict:
    return {"median": float(np.median(values)), "max": float(np.max(values))} if values else {
        "median": None, "max": None}


def arm_summary(measured: Iterable[dict[str, float]]) -> dict:
    """Per layer (in the model's order): median and max of σ over the arm's trials; and the same of each trial's
    product of σ."""
    per_layer: dict[str, list[float]] = {}
    products = []
    count = 0
    for sigmas in measured:
        count += 1
        for name, value in sigmas.items():
            per_layer.setdefault(name, []).append(value)
        products.append(math.prod(sigmas.values()))
    return {"trials_measured": count,
            "layers": [{"layer": name, **_spread(per_layer[name])} for name in sorted(per_layer, key=_layer_order)],
            "lipschitz_bound": _spread(products)}


def check(sn: Sequence[tuple[str, dict[str, float], dict | None]],
          baseline: Sequence[tuple[str, dict[str, float], dict | None]]) -> dict:
    """The manipulation check over (trial_id, σ by layer, hyper-parameters) of completed trials per arm."""
    sn_over = [trial_id for trial_id, sigmas, hp in sn
               if any(sigmas[name] > SN_TOLERANCE for name in wrapped_layers(sigmas, hp))]
    base_under = [trial_id for trial_id, sigmas, _ in baseline if sigmas and all(v <= 1 for v in sigmas.values())]
    return {
        "tolerance": SN_TOLERANCE,
        "spectral_norm": arm_summary(sigmas for _, sigmas, _ in sn),
        "baseline": arm_summary(sigmas for _, sigmas, _ in baseline),
        "sn_trials_over_tolerance": len(sn_over),
        "baseline_trials_all_at_most_one": len(base_under),
        "examples": {"spectral_norm": sorted(sn_over)[:3], "baseline": sorted(base_under)[:3]},
        "passed": None if not sn and not baseline else not sn_over and not base_under,
    }


def warnings(result: dict) -> list[str]:
    out = []
    examples = {arm: ", ".join(ids) for arm, ids in result["examples"].items()}
    if result["sn_trials_over_tolerance"]:
        out.append(f"manipulation check: {result['sn_trials_over_tolerance']} of "
                   f"{result['spectral_norm']['trials_measured']} spectral-norm trials have a wrapped layer with "
                   f"σ > {SN_TOLERANCE} at their last epoch (e.g. {examples['spectral_norm']}): their layers may "
                   "not be spectrally normalized, so the arms may not be what their labels say.")
    if result["baseline_trials_all_at_most_one"]:
        out.append(f"manipulation check: {result['baseline_trials_all_at_most_one']} of "
                   f"{result['baseline']['trials_measured']} baseline trials have every layer at σ ≤ 1 (e.g. "
                   f"{examples['baseline']}): they look spectrally "
                   "normalized, so the arms may not be what their labels say.")
    return out
