"""The model under study: an MLP of `nn.Linear` layers, optionally spectrally normalized, and the measurement
that shows spectral normalization at work (the largest singular value of each Linear's effective weight)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as _SpectralNormParametrization
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

MODEL_NAME = "mlp"


class MLP(nn.Module):
    """`depth` hidden Linear layers of `hidden` units (ReLU, dropout), then a Linear output layer."""

    def __init__(self, in_features: int, n_classes: int, hidden: int, depth: int, dropout: float):
        super().__init__()
        widths = [in_features] + [hidden] * depth
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(widths, widths[1:], strict=False)])
        self.layers.append(nn.Linear(widths[-1], n_classes))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *hidden, output = self.layers
        for layer in hidden:
            x = self.dropout(torch.relu(layer(x)))
        return output(x)


def build_model(
    in_features: int, n_classes: int, *, hidden: int, depth: int, dropout: float,
    spectral_norm: bool, sn_output_layer: bool = True,
) -> MLP:
    """The MLP; with `spectral_norm` every Linear (the output layer only when `sn_output_layer`) is wrapped with
    `torch.nn.utils.parametrizations.spectral_norm`, so its effective weight is W / sigma_max(W)."""
    model = MLP(in_features, n_classes, hidden, depth, dropout)
    if spectral_norm:
        last = len(model.layers) - 1
        for index, layer in enumerate(model.layers):
            if index < last or sn_output_layer:
                model.layers[index] = _spectral_norm(layer)
    return model


SN_REFRESH_ITERATIONS = 50  # 10 left sigma at up to 1.13 (digits, lr 1e-2, 15 epochs); 50 held it within 1.001


@torch.no_grad()
def refresh_spectral_norm(model: nn.Module, iterations: int = SN_REFRESH_ITERATIONS) -> None:
    """Converge every spectrally normalized layer's power-iteration vectors to its current weight.

    torch's spectral_norm runs one power iteration per training step, so after an epoch's last optimizer step its
    estimate sigma_hat lags sigma_max(W), and in eval mode the effective weight W / sigma_hat had sigma up to 1.23 (make
    demo, digits). A few more iterations on the current weight make the model that is evaluated, measured and
    saved the normalized one (tests/test_worker.py::test_sn_arm_has_unit_singular_values_and_baseline_does_not)."""
    for module in model.modules():
        if _is_spectral_norm(module):  # what reading .weight in training mode runs, without the division
            norm = module.parametrizations.weight[0]
            norm._power_method(norm._reshape_weight_to_matrix(module.parametrizations.weight.original), iterations)


class SingularValueMeter:
    """sigma_max of every Linear's effective `.weight`, measured the same way in both arms, never above it.

    Block power (subspace) iteration with 4 vectors, warm-started: each layer's subspace carries over from the
    previous epoch, 3 iterations per epoch, then the largest singular value of the weight restricted to it
    (Rayleigh-Ritz). Cheaper readings were measured and do not hold 1%
    (tests/test_worker.py::test_singular_value_meter_tracks_training):
    - one warm-started step per epoch, with one vector or a block of 4, was up to 29% or 11% low on real
      digits/breast_cancer trials, whose top singular directions cross while training;
    - for a spectrally normalized layer, its parametrization's own vectors (`_u`, `_v`, sigma_hat = u^T W v) are
      blind to what they have not converged to: ||W v|| / sigma_hat read 1.000 where the effective weight's
      sigma was 1.013 (digits, epoch 2). The meter's own subspace alone, on the other hand, was 2.8% low on an SN
      layer, whose trained spectrum is flat near 1. So an SN layer's `_v` joins its subspace: the reading is at
      least as good as either.
    Call it in eval mode: reading `.weight` of a spectrally normalized layer in training mode runs SN's power
    iteration and would change the training it measures."""

    BLOCK = 4
    FIRST_ITERATIONS = 20
    ITERATIONS = 3

    def __init__(self, seed: int = 0):
        self._generator = torch.Generator().manual_seed(seed)
        self._layout: list[tuple[str, torch.Size]] = []
        self._subspaces: torch.Tensor | None = None  # one block per layer, in the layout's order

    @torch.no_grad()
    def measure(self, model: nn.Module) -> dict[str, float]:
        """All layers in one batch (weights zero-padded to a common shape, which changes no singular value):
        a dozen tensor operations an epoch whatever the depth, instead of a dozen per layer."""
        if model.training:
            raise RuntimeError("measure singular values in eval mode: in training mode it would update SN's state")
        layers = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        if not layers:
            return {}
        weights = [module.weight for _, module in layers]
        rows, columns = max(w.shape[0] for w in weights), max(w.shape[1] for w in weights)
        batch = torch.stack([nn.functional.pad(w, (0, columns - w.shape[1], 0, rows - w.shape[0]))
                             for w in weights])
        layout = [(name, weight.shape) for (name, _), weight in zip(layers, weights, strict=True)]
        subspaces, iterations = self._subspaces, self.ITERATIONS
        if subspaces is None or layout != self._layout:
            subspaces = torch.randn(len(layers), columns, min(self.BLOCK, columns), generator=self._generator)
            subspaces, iterations = subspaces.to(batch.device), self.FIRST_ITERATIONS
        for index, (_, module) in enumerate(layers):
            if _is_spectral_norm(module):  # the block must contain SN's own estimate (the block's span is kept)
                hint = module.parametrizations.weight[0]._v
                subspaces[index, :, -1] = 0
                subspaces[index, :hint.shape[0], -1] = hint
        for _ in range(iterations):
            subspaces, _ = torch.linalg.qr(batch.mT @ (batch @ subspaces))
        values = torch.linalg.svdvals(batch @ subspaces)[:, 0].tolist()
        self._layout, self._subspaces = layout, subspaces
        measured = {name: value for (name, _), value in zip(layout, values, strict=True) if math.isfinite(value)}
        if len(measured) < len(layout):  # diverged: the loss check ends the trial as nan_loss; start afresh
            self._subspaces = None
        return measured


def _is_spectral_norm(module: nn.Module) -> bool:
    if not parametrize.is_parametrized(module, "weight"):
        return False
    chain = module.parametrizations.weight
    return len(chain) == 1 and isinstance(chain[0], _SpectralNormParametrization)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def state_dict_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the state_dict (a parametrized module cannot be pickled whole; its state_dict can)."""
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
