"""The gate math against hand-computed values."""

import math

import pytest
import torch

from peft_gates import gates


def test_eval_value_matches_formula():
    theta = torch.tensor([1.0, 0.0, -0.2, math.atanh(-0.5), -3.0])
    # clamp(tanh(theta) + 0.5, 0, 1)
    expected = torch.tensor([1.0, 0.5, 0.5 + math.tanh(-0.2), 0.0, 0.0])
    torch.testing.assert_close(gates.eval_value(theta), expected, atol=1e-6, rtol=0)


def test_open_probability_is_gaussian_cdf():
    theta = torch.tensor([0.0, math.atanh(-0.5), 1.0])
    sigma = 0.5
    phi = [0.5 * (1 + math.erf(((math.tanh(t) + 0.5) / sigma) / math.sqrt(2))) for t in theta.tolist()]
    torch.testing.assert_close(gates.open_probability(theta, sigma), torch.tensor(phi), atol=1e-6, rtol=0)
    assert gates.open_probability(torch.tensor([math.atanh(-0.5)]), sigma).item() == pytest.approx(0.5)


def test_sparsity_term_is_distance_of_mean_open_probability_to_keep():
    theta = torch.tensor([0.0, 0.0])  # p = Phi(1) each
    p = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    assert gates.sparsity_term(theta, keep=0.6, sigma=0.5).item() == pytest.approx(abs(p - 0.6), abs=1e-6)


def test_init_is_open_at_paper_defaults():
    theta = gates.init_theta(1000, mean=1.0, std=0.1, generator=torch.Generator().manual_seed(0))
    assert theta.dtype == torch.float32
    assert theta.mean().item() == pytest.approx(1.0, abs=0.02)
    assert (gates.eval_value(theta) == 1).all()


def test_gate_sample_task_gradient_and_injected_sparsity_gradient():
    theta = torch.tensor([0.1, -0.3, 2.0], requires_grad=True)
    noise = torch.tensor([0.05, 0.0, 0.0])
    coef = 3.0
    z = gates.GateSample.apply(theta, noise, 0.7, 0.5, coef, None)
    torch.testing.assert_close(z.detach(), torch.clamp(torch.tanh(theta.detach()) + noise + 0.5, 0, 1))
    upstream = torch.tensor([1.0, 2.0, 5.0])
    z.backward(upstream)

    reg = gates.sparsity_term_grad(theta.detach(), 0.7, 0.5)
    sech2 = 1 - torch.tanh(theta.detach()) ** 2
    inside = torch.tensor([1.0, 1.0, 0.0])  # the third gate is clamped at 1: no task gradient
    torch.testing.assert_close(theta.grad, upstream * inside * sech2 + coef * reg)


def test_zero_coefficient_injects_nothing():
    theta = torch.tensor([0.1, -0.3], requires_grad=True)
    gates.GateSample.apply(theta, torch.zeros(2), 0.7, 0.5, 0.0, None).sum().backward()
    torch.testing.assert_close(theta.grad, 1 - torch.tanh(theta.detach()) ** 2)


def test_coefficient_averages_over_layers_and_sides():
    coef = gates.SparsityCoefficient(weight=50.0, grad_scale=0.5, num_terms=10)
    assert coef.per_vector(sides=2) == pytest.approx(50.0 * 0.5 / 10 / 2)


def test_closed_form_sparsity_gradient_equals_autograd():
    theta = torch.linspace(-2.0, 2.0, 37, requires_grad=True)
    for keep in (0.2, 0.9):
        (expected,) = torch.autograd.grad(gates.sparsity_term(theta, keep, 0.5), theta)
        torch.testing.assert_close(gates.sparsity_term_grad(theta.detach(), keep, 0.5), expected)
