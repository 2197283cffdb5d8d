"""Model: the Crystal architecture (`crystal`) and its muP initialisation and parameter groups (`mup`)."""

from __future__ import annotations

import torch

from crystal_lm.config import ModelConfig, MupConfig
from crystal_lm.model.crystal import CrystalModel, count_parameters
from crystal_lm.model.mup import init_weights, param_groups

__all__ = ["CrystalModel", "build_model", "count_parameters", "param_groups"]


def build_model(
    cfg: ModelConfig,
    mup: MupConfig,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    init: bool = True,
) -> CrystalModel:
    """Build the model on `device` ("meta" builds shapes only, for parameter counts of large recipes)."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = CrystalModel(cfg, mup)
    if init and str(device) != "meta":
        init_weights(model)
    return model
