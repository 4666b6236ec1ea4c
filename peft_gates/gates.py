"""The gate math of FineGates (arXiv 2602.09169), in one place.

Every gate is one raw trainable scalar ``theta``; ``mu = tanh(theta)``.

* training value: ``z = clamp(mu + eps + 0.5, 0, 1)``, ``eps ~ N(0, noise_std^2)``, one draw per gate
  per forward (shared by all tokens of the batch);
* eval value: ``z = clamp(mu + 0.5, 0, 1)``; a unit is removable iff its eval value is exactly 0
  (``mu <= -0.5``); values strictly between 0 and 1 are learned scales that fold into the weights;
* open probability: ``p = Phi((mu + 0.5) / sigma)`` (the STG relaxation of the L0 norm);
* sparsity term of one gate vector: ``|mean(p) - keep|`` with ``keep = 1 - target_sparsity``;
* global budget (``GateConfig.sparsity_scope="global"``): one term over every gate under the sparsity
  term, ``|sum_i w_i p_i / sum_i w_i - keep|``, ``w_i`` the weights that closing gate ``i`` removes, so
  the layers share one parameter budget instead of each meeting the target;
* recovery phase (``GateConfig.recovery_start_step``): training uses the eval value with no noise and no
  sparsity term, so training sees exactly the model the merge produces.

The sparsity term does not travel through the loss. :class:`GateSample` adds its gradient in the
backward pass of the gate sample itself, which is the one place that works unchanged under DDP,
ZeRO-2/3 (where the parameter is partitioned outside the forward) and reentrant gradient
checkpointing (where the first forward runs under ``no_grad``); see docs/concepts.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OPEN_OFFSET = 0.5


def init_theta(size: int, mean: float, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Raw gate parameters ``theta ~ N(mean, std^2)`` in fp32 (the paper's init: mean 1.0, std 0.1)."""
    return torch.randn(size, generator=generator, dtype=torch.float32) * std + mean


def eval_value(theta: torch.Tensor) -> torch.Tensor:
    """Deterministic gate value used at eval time and folded into the weights by the merge."""
    return torch.clamp(torch.tanh(theta) + OPEN_OFFSET, 0.0, 1.0)


def open_probability(theta: torch.Tensor, sigma: float) -> torch.Tensor:
    """``P(z > 0) = Phi((mu + 0.5) / sigma)``: the smooth count of open gates that the loss targets."""
    return 0.5 * (1.0 + torch.erf((torch.tanh(theta) + OPEN_OFFSET) / (sigma * math.sqrt(2.0))))


def sparsity_term(theta: torch.Tensor, keep: float, sigma: float) -> torch.Tensor:
    """``|mean(p) - keep|`` for one gate vector (one side, rows or columns, of one layer)."""
    return (open_probability(theta, sigma).mean() - keep).abs()


def open_probability_grad(theta: torch.Tensor, sigma: float) -> torch.Tensor:
    """``dp / dtheta = phi((mu + 0.5) / sigma) / sigma * (1 - tanh(theta)^2)``, ``phi`` the normal density."""
    mu = torch.tanh(theta)
    u = (mu + OPEN_OFFSET) / sigma
    return torch.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi) / sigma * (1.0 - mu * mu)


def sparsity_term_grad(theta: torch.Tensor, keep: float, sigma: float) -> torch.Tensor:
    """Closed-form ``d sparsity_term / d theta`` (a nested autograd call per gate vector costs more):
    ``sign(mean p - keep) / n * dp/dtheta``."""
    p = open_probability(theta, sigma)
    return torch.sign(p.mean() - keep) / theta.numel() * open_probability_grad(theta, sigma)


class OpenMassBudget:
    """The global budget's running sum: the weighted open mass ``w * sum(p)`` of every gate vector.

    Each gate vector owns a slot. A layer writes its slot at every training forward (a recomputed
    forward under gradient checkpointing writes the same value again), and every backward reads the
    total, by which time all layers of the step have run their forward. A slot that has not been written
    yet counts as fully open. The slots live in one tensor so that a backward costs one reduction, not
    one per layer; nothing here is saved, the first forward after a resume refills it.
    """

    def __init__(self, vector_weights: list[float]) -> None:
        self.total = float(sum(vector_weights))
        self.mass = torch.tensor(vector_weights, dtype=torch.float32)
        self._placed = False

    def record(self, slot: int, weighted_mass: torch.Tensor) -> None:
        if not self._placed:  # live where the first layer trains, so recording never syncs a GPU
            self.mass, self._placed = self.mass.to(weighted_mass.device), True
        self.mass[slot] = weighted_mass.detach().to(self.mass.device, torch.float32)

    def open_fraction(self) -> torch.Tensor:
        """``sum_i w_i p_i / sum_i w_i`` over every gate under the term, as of the latest forwards."""
        return self.mass.sum() / self.total


@dataclass
class SparsityCoefficient:
    """How strongly the sparsity gradient is injected; shared by every gate layer of one tuner.

    ``weight`` is lambda after its schedule (delay, warm-up); ``grad_scale`` divides by gradient
    accumulation steps and multiplies by an fp16 loss scale, so the term has the same strength as a
    term added to the (scaled, averaged) loss would. ``num_terms`` is the number of gated layers the
    sparsity loss averages over; each side of a layer with both row and column gates counts half.
    ``recovering`` is set in the recovery phase, where the layers draw no noise. ``budget`` is the
    global budget's running sum (``GateConfig.sparsity_scope="global"``), None for per-layer terms.
    """

    weight: float
    grad_scale: float = 1.0
    num_terms: int = 1
    recovering: bool = False
    budget: OpenMassBudget | None = None

    def per_vector(self, sides: int) -> float:
        return self.weight * self.grad_scale / max(self.num_terms, 1) / sides


class GateSample(torch.autograd.Function):
    """Training gate sample whose backward also adds ``coef * d sparsity_term / d theta``.

    ``value`` is computed outside (so the noise draw is the module's, replayed identically by
    checkpoint recomputation); this function only routes gradients: the task gradient through the
    clamp/tanh and the regularizer gradient, in closed form, from ``theta``. With a global ``budget``
    the regularizer gradient is ``coef * sign(open fraction - keep) * dp/dtheta``, where ``coef``
    already carries this vector's weight share ``w / sum w``.
    """

    @staticmethod
    def forward(
        ctx,
        theta: torch.Tensor,
        noise: torch.Tensor,
        keep: float,
        sigma: float,
        coef: float,
        budget: OpenMassBudget | None,
    ):
        pre = torch.tanh(theta) + noise + OPEN_OFFSET
        ctx.save_for_backward(theta, pre)
        ctx.keep, ctx.sigma, ctx.coef, ctx.budget = keep, sigma, coef, budget
        return torch.clamp(pre, 0.0, 1.0)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        theta, pre = ctx.saved_tensors
        inside = ((pre > 0.0) & (pre < 1.0)).to(grad_out.dtype)
        grad = grad_out * inside * (1.0 - torch.tanh(theta) ** 2)
        if ctx.coef != 0.0:
            if ctx.budget is None:
                grad = grad + ctx.coef * sparsity_term_grad(theta, ctx.keep, ctx.sigma)
            else:
                sign = torch.sign(ctx.budget.open_fraction() - ctx.keep).to(theta.device)
                grad = grad + ctx.coef * sign * open_probability_grad(theta, ctx.sigma)
        return grad, None, None, None, None, None


def sample_with_sparsity_grad(
    theta: torch.Tensor,
    noise_std: float,
    keep: float,
    sigma: float,
    coef: float,
    budget: OpenMassBudget | None = None,
) -> torch.Tensor:
    """Training gate values for ``theta`` with the sparsity gradient attached (see :class:`GateSample`)."""
    noise = torch.randn_like(theta) * noise_std if noise_std > 0 else torch.zeros_like(theta)
    return GateSample.apply(theta, noise, keep, sigma, coef, budget)
