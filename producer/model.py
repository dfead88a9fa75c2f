"""The model under study: an MLP of `nn.Linear` layers, optionally spectrally normalized, and the measurement
that shows spectral normalization at work (the largest singular value of each Linear's effective weight)."""

from __future__ import annotations

import torch
from torch import nn
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


@torch.no_grad()
def largest_singular_values(model: nn.Module) -> dict[str, float]:
    """sigma_max of every Linear's effective `.weight`, measured the same way in both arms (exact, by SVD).

    Call it in eval mode: reading `.weight` of a spectrally normalized layer in training mode runs a power
    iteration and would change the training it measures."""
    if model.training:
        raise RuntimeError("measure singular values in eval mode: in training mode it would update SN's state")
    return {
        name: float(torch.linalg.matrix_norm(module.weight, ord=2))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def state_dict_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the state_dict (a parametrized module cannot be pickled whole; its state_dict can)."""
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
