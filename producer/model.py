"""The model under study: an MLP of `nn.Linear` layers, optionally spectrally normalized, and the measurement
that shows spectral normalization at work (the largest singular value of each Linear's effective weight)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
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
    was_training = model.training
    model.train()  # reading a parametrized weight in training mode runs one power iteration
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            for _ in range(iterations):
                _ = module.weight
    model.train(was_training)


class SingularValueMeter:
    """sigma_max of every Linear's effective `.weight`, measured the same way in both arms.

    Block power (subspace) iteration with 4 vectors, warm-started: each layer's subspace carries over from the
    previous epoch, so 3 iterations per epoch track sigma_max to within 1% relative even for freshly initialised
    weights, whose top singular values are clustered (the worst case; trained weights converge faster). It
    slightly underestimates, never overestimates. An exact SVD takes ~5 ms per 256x256 layer on this 2-core CPU
    (a deep, wide trial with ~25 ms epochs would spend ~40% of its time measuring); this takes ~0.3 ms.
    Call it in eval mode: reading `.weight` of a spectrally normalized layer in training mode runs SN's power
    iteration and would change the training it measures."""

    BLOCK = 4
    FIRST_ITERATIONS = 20
    ITERATIONS = 3

    def __init__(self, seed: int = 0):
        self._generator = torch.Generator().manual_seed(seed)
        self._subspaces: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def measure(self, model: nn.Module) -> dict[str, float]:
        if model.training:
            raise RuntimeError("measure singular values in eval mode: in training mode it would update SN's state")
        sigmas = {}
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            weight = module.weight
            if not torch.isfinite(weight).all():  # diverged: the loss check ends the trial as nan_loss
                self._subspaces.pop(name, None)
                continue
            subspace = self._subspaces.get(name)
            iterations = self.ITERATIONS
            if subspace is None:
                columns = min(self.BLOCK, *weight.shape)
                subspace = torch.randn(weight.shape[1], columns, generator=self._generator).to(weight.device)
                iterations = self.FIRST_ITERATIONS
            for _ in range(iterations):
                subspace, _ = torch.linalg.qr(weight.T @ (weight @ subspace))
            self._subspaces[name] = subspace
            sigmas[name] = float(torch.linalg.svdvals(weight @ subspace)[0])
        return sigmas


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def state_dict_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the state_dict (a parametrized module cannot be pickled whole; its state_dict can)."""
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
