"""CorDA decomposition of one input group's layers, exactly as peft does it, plus the diagnostics a user needs.

For a group's covariance C (the layers share it, so the damped inverse is computed once per group, where peft
computes it per layer):
    C' = C + d·mean(diag C)·I     d from 0.01 doubling until ‖C'·C'⁻¹ − I‖_F < 0.05 (peft), or fixed
    U, S, Vᵀ = svd(W·C');  V ← (Vᵀ·C'⁻¹)ᵀ
    ipm keeps the top-r components, kpm the bottom-r
    S ← S / scaling;  A = √S·Vᵀ;  B = U·√S;  W_res = W − scaling·B·A          (peft's `corda_init`)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workers.corda.covariance import GroupStats


@dataclass
class LayerInit:
    name: str
    lora_A: torch.Tensor  # [r, in]
    lora_B: torch.Tensor  # [out, r]
    residual: torch.Tensor | None  # [out, in], the base weight's dtype; None once written to residual_base
    reconstruction_error: float  # ‖W − (W_res + scaling·B·A)‖ / ‖W‖
    spectrum: list[float]  # singular values of W·C' (all), for the report


@dataclass
class GroupInit:
    group: str
    modules: tuple[str, ...]
    samples: int
    tokens: int
    dim: int
    effective_rank: float  # exp(entropy of the normalised eigenvalues of C)
    numerical_rank: int  # eigenvalues above dim·eps·λmax
    condition_number: float  # of the damped C'
    damping: float  # the multiplier d actually used
    inverse_error: float
    eigenvalues: list[float] = field(default_factory=list)  # of C, descending, for the report
    layers: list[LayerInit] = field(default_factory=list)


def damp(cov: torch.Tensor, damping: float | str) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(C', C'⁻¹, d, ‖C'·C'⁻¹ − I‖_F) with peft's doubling rule, or a fixed d."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    mean_diag = torch.mean(torch.diag(cov))
    d = 0.01 if damping == "auto" else float(damping)
    while True:
        fixed = cov + eye * mean_diag * d
        inv = torch.linalg.inv(fixed)
        error = torch.dist(fixed @ inv, eye).item()
        if damping != "auto" or error < 0.05:
            return fixed, inv, d, error
        d *= 2
        if d > 1e6:
            raise ValueError("covariance could not be made invertible by damping; is the calibration data empty?")


def decompose_group(
    stats: GroupStats,
    group: str,
    modules: tuple[str, ...],
    weights: dict[str, torch.Tensor],
    r: int,
    mode: str,
    scaling: float,
    damping: float | str = "auto",
) -> GroupInit:
    if stats.samples == 0:
        raise ValueError(f"input group {group}: no calibration samples reached it")
    cov = (stats.xtx / stats.samples).float()  # peft divides by the sample count and decomposes in fp32
    if not torch.isfinite(cov).all():
        raise ValueError(f"input group {group}: covariance has NaN/Inf")
    eig = torch.linalg.eigvalsh(cov.double()).flip(0).clamp_min(0)
    p = eig / eig.sum() if eig.sum() > 0 else eig
    nz = p[p > 0]
    eff_rank = float(torch.exp(-(nz * nz.log()).sum())) if len(nz) else 0.0
    num_rank = int((eig > eig[0] * cov.shape[0] * torch.finfo(torch.float32).eps).sum()) if eig[0] > 0 else 0
    fixed, inv, d, inv_err = damp(cov, damping)
    shift = float(torch.mean(torch.diag(cov))) * d  # C' = C + shift·I: its eigenvalues are C's, shifted
    result = GroupInit(
        group=group, modules=modules, samples=stats.samples, tokens=stats.tokens, dim=cov.shape[0],
        effective_rank=eff_rank, numerical_rank=num_rank,
        condition_number=float((eig[0] + shift) / (eig[-1] + shift)) if eig[-1] + shift > 0 else float("inf"),
        damping=d, inverse_error=inv_err, eigenvalues=[float(v) for v in eig],
    )
    for name in modules:
        result.layers.append(decompose_layer(name, weights[name], fixed, inv, r, mode, scaling))
    return result


def decompose_layer(
    name: str, weight: torch.Tensor, fixed: torch.Tensor, inv: torch.Tensor, r: int, mode: str, scaling: float
) -> LayerInit:
    w = weight.float()
    if r > min(w.shape):
        raise ValueError(f"{name}: adapter.r {r} exceeds the layer's smallest dimension {min(w.shape)}")
    U, S, Vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    V = (Vh @ inv).T
    keep = slice(None, r) if mode == "ipm" else slice(-r, None)
    U, S_r, V = U[:, keep], S[keep].clone(), V[:, keep]
    S_r /= scaling
    lora_A = V.T.mul(S_r.sqrt().view(-1, 1)).contiguous()
    lora_B = U.mul(S_r.sqrt()).contiguous()
    residual = (w - scaling * lora_B @ lora_A).to(weight.dtype)
    rebuilt = residual.float() + scaling * lora_B @ lora_A
    error = float(torch.linalg.norm(w - rebuilt) / torch.linalg.norm(w))
    return LayerInit(name, lora_A, lora_B, residual, error, [float(s) for s in S])
