"""The GReg objective: hinge zero on the correct side, gradient term = finite differences."""

import pytest
import torch
from torch import nn

from training.losses import GRegLoss, correct_side, energy_gradient_norms, energy_hinge
from training.scores import energy


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).double()


def test_hinge_is_zero_on_the_correct_side_of_each_margin():
    m_in, m_out = -25.0, -7.0
    e_in = torch.tensor([-30.0, -25.0, -40.0])
    e_out = torch.tensor([-7.0, 0.0, 3.0])
    assert energy_hinge(e_in, e_out, m_in, m_out) == 0


def test_hinge_is_squared_violation_averaged_per_group():
    e_in = torch.tensor([-23.0, -30.0])  # first violates m_in=-25 by 2
    e_out = torch.tensor([-10.0, -7.0, -4.0, -1.0])  # first violates m_out=-7 by 3
    expected = (2.0**2) / 2 + (3.0**2) / 4
    assert energy_hinge(e_in, e_out, -25.0, -7.0).item() == pytest.approx(expected)


def finite_difference_grad_norm(model, x: torch.Tensor, eps: float = 1e-6) -> float:
    """||d energy / d x|| by central differences, one coordinate at a time."""
    flat = x.detach().clone().flatten()
    grad = torch.zeros_like(flat)
    for i in range(flat.numel()):
        for sign in (1, -1):
            probe = flat.clone()
            probe[i] += sign * eps
            grad[i] += sign * energy(model(probe.view_as(x).unsqueeze(0))).item()
    return (grad / (2 * eps)).norm().item()


def test_gradient_norm_matches_finite_differences_and_is_zero_on_wrong_side():
    model = tiny_model()
    x = torch.randn(6, 3, 2, 2, dtype=torch.double, requires_grad=True)
    e = energy(model(x)).double()
    mask = torch.tensor([True, False, True, True, False, True])
    norms = energy_gradient_norms(x, e, mask)
    for i in range(6):
        if mask[i]:
            assert norms[i].item() == pytest.approx(finite_difference_grad_norm(model, x[i]),
                                                    rel=1e-6)
        else:
            assert norms[i].item() == 0.0


def test_gradient_term_is_differentiable_twice():
    """The penalty must train the weights (double backprop), not be a constant."""
    model = tiny_model()
    x = torch.randn(4, 3, 2, 2, dtype=torch.double, requires_grad=True)
    norms = energy_gradient_norms(x, energy(model(x)).double(), torch.ones(4, dtype=torch.bool))
    norms.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()
               if p.dim() == 2)


def test_greg_loss_uses_only_correctly_detected_samples():
    model = tiny_model()
    x_in = torch.randn(4, 3, 2, 2, dtype=torch.double)
    x_out = torch.randn(6, 3, 2, 2, dtype=torch.double)
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        e = energy(model(torch.cat([x_in, x_out])))
    # Margins placed between the samples' energies, so both sides are populated.
    m_in = float(e[:4].median())
    m_out = float(e[4:].median())
    if m_in >= m_out:
        m_in = m_out - 1e-3
    loss = GRegLoss("greg", lambda_energy=0.1, lambda_grad=1.0, m_in=m_in, m_out=m_out)
    terms = loss(model, x_in, y, x_out)
    mask = correct_side(e[:4], e[4:], m_in, m_out)
    manual = 0.0
    for group, offset, n in ((x_in, 0, 4), (x_out, 4, 6)):
        manual += sum(finite_difference_grad_norm(model, group[i]) for i in range(n)
                      if mask[offset + i]) / n
    assert terms.grad.item() == pytest.approx(manual, rel=1e-5)
    assert 0 < terms.correct_in < 1 or 0 < terms.correct_out < 1


def test_reference_scaling_divides_by_batch_size():
    model = tiny_model()
    x_in, x_out = torch.randn(4, 3, 2, 2).double(), torch.randn(6, 3, 2, 2).double()
    y = torch.tensor([0, 1, 2, 3])
    kw = {"m_in": -100.0, "m_out": -100.0 + 1e-9}  # every outlier on the correct side
    paper = GRegLoss("greg", grad_scaling="paper", **kw)(model, x_in, y, x_out).grad
    ref = GRegLoss("greg", grad_scaling="reference", **kw)(model, x_in, y, x_out).grad
    assert paper > 0
    assert ref.item() == pytest.approx(paper.item() / 10)


def test_modes_add_terms_progressively():
    model = tiny_model()
    x_in, x_out = torch.randn(4, 3, 2, 2).double(), torch.randn(6, 3, 2, 2).double()
    y = torch.tensor([0, 1, 2, 3])
    kw = {"m_in": -100.0, "m_out": -99.0}
    ce = GRegLoss("ce", **kw)(model, x_in, y, x_out)
    en = GRegLoss("energy", **kw)(model, x_in, y, x_out)
    gr = GRegLoss("greg", **kw)(model, x_in, y, x_out)
    assert ce.energy == 0 and ce.grad == 0
    assert en.energy > 0 and en.grad == 0
    assert gr.grad > 0
    assert en.total.item() == pytest.approx(ce.total.item() + 0.1 * en.energy.item())
    assert gr.total.item() == pytest.approx(en.total.item() + gr.grad.item())


def test_eval_bn_mode_gives_exact_per_sample_gradients_with_batchnorm():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 16, 3)).double()
    model.train()
    for _ in range(3):  # give BN non-trivial running statistics
        model(torch.randn(8, 3, 4, 4).double())
    x_in, x_out = torch.randn(3, 3, 4, 4).double(), torch.randn(3, 3, 4, 4).double()
    y = torch.tensor([0, 1, 2])
    kw = {"m_in": -1000.0, "m_out": -999.0}  # all outliers on the correct side, no ID
    terms = GRegLoss("greg", grad_bn="eval", **kw)(model, x_in, y, x_out, eval_model=model)
    assert model.training  # restored
    model.eval()
    expected = sum(finite_difference_grad_norm(model, x_out[i]) for i in range(3)) / 3
    assert terms.grad.item() == pytest.approx(expected, rel=1e-5)
