"""Did spectral normalization take? The measured largest singular value σ of each Linear layer at a trial's last
epoch, per arm: spectrally normalized layers sit at σ ≈ 1, unconstrained ones drift above it. The product of a
trial's σ is an upper bound on the MLP's Lipschitz constant (ReLU and dropout at eval are 1-Lipschitz)."""

from __future__ import annotations

import heapq
import re
from collections.abc import Sequence
from itertools import chain

import numpy as np

# A wrapped layer measured above this is not normalized (torch's one power iteration per step and our measurement
# leave a few per mille either way; 5% is far beyond that).
SN_TOLERANCE = 1.05


def _layer_order(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _spread(values: Sequence[float]) -> dict:
    return {"median": float(np.median(values)), "max": float(np.max(values))} if len(values) else {
        "median": None, "max": None}


def _matrices(measured: Sequence[dict[str, float]]) -> list[tuple[tuple[str, ...], np.ndarray, np.ndarray]]:
    """The σ dicts grouped by their layer names (in their order): (names, positions in `measured`, σ as a
    trials × layers matrix) per group, usually one."""
    layouts = list(map(tuple, measured))
    if layouts and layouts.count(layouts[0]) == len(layouts):  # one layout: no grouping
        groups = {layouts[0]: range(len(layouts))}
    else:
        groups = {}
        for i, names in enumerate(layouts):
            groups.setdefault(names, []).append(i)
    out = []
    for names, at in groups.items():
        chosen = measured if isinstance(at, range) else map(measured.__getitem__, at)
        values = np.fromiter(chain.from_iterable(map(dict.values, chosen)), float, len(at) * len(names))
        out.append((names, np.asarray(at), values.reshape(len(at), len(names))))
    return out


def arm_summary(measured: Sequence[dict[str, float]], groups: list | None = None) -> dict:
    """Per layer (in the model's order): median and max of σ over the arm's trials; and the same of each trial's
    product of σ (multiplied in the dict's order)."""
    per_layer: dict[str, list[np.ndarray]] = {}
    products = []
    for names, _, sigma in _matrices(measured) if groups is None else groups:
        product = np.ones(len(sigma))
        for k, name in enumerate(names):
            per_layer.setdefault(name, []).append(sigma[:, k])
            product = product * sigma[:, k]
        products.append(product)
    return {"trials_measured": len(measured),
            "layers": [{"layer": name, **_spread(np.concatenate(per_layer[name]))}
                       for name in sorted(per_layer, key=_layer_order)],
            "lipschitz_bound": _spread(np.concatenate(products) if products else [])}


Arm = tuple[Sequence[str], Sequence[dict[str, float]], Sequence[dict | None]]


def check(sn: Arm, baseline: Arm) -> dict:
    """The manipulation check over the completed trials of each arm, given as (trial ids, σ by layer,
    hyper-parameters), one entry per trial in each. A spectral-norm trial wraps every Linear layer, but the output
    (last in the model's order) when it says `sn_output_layer: false`; a wrapped layer above SN_TOLERANCE fails it.
    A baseline trial with every layer at σ ≤ 1 looks normalized."""
    (sn_ids, sn_sigmas, sn_hps), (base_ids, base_sigmas, _) = sn, baseline
    sn_groups, base_groups = _matrices(sn_sigmas), _matrices(base_sigmas)
    over = np.zeros(len(sn_ids), bool)
    for names, at, sigma in sn_groups:
        all_wrapped = sigma > SN_TOLERANCE
        if names:  # the output layer is exempt where a trial says it is not wrapped (its hyper-parameters are read
            # only for trials with that layer above the tolerance)
            last = names.index(sorted(names, key=_layer_order)[-1])
            all_wrapped[[k for k in np.flatnonzero(all_wrapped[:, last]).tolist()
                         if (sn_hps[at[k]] or {}).get("sn_output_layer") is False], last] = False
        over[at] = all_wrapped.any(axis=1)
    under = np.zeros(len(base_ids), bool)
    for names, at, sigma in base_groups:
        under[at] = bool(names) and (sigma <= 1).all(axis=1)
    sn_over = [sn_ids[i] for i in np.flatnonzero(over).tolist()]
    base_under = [base_ids[i] for i in np.flatnonzero(under).tolist()]
    return {
        "tolerance": SN_TOLERANCE,
        "spectral_norm": arm_summary(sn_sigmas, sn_groups),
        "baseline": arm_summary(base_sigmas, base_groups),
        "sn_trials_over_tolerance": len(sn_over),
        "baseline_trials_all_at_most_one": len(base_under),
        "examples": {"spectral_norm": heapq.nsmallest(3, sn_over), "baseline": heapq.nsmallest(3, base_under)},
        "passed": None if not sn_ids and not base_ids else not sn_over and not base_under,
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
