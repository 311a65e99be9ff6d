"""Weight-space interpolation (WiSE-FT) between a run's starting and fine-tuned weights, and
uniform averages of weight sets (model soups)."""

import pytest
import torch

from training.models import build_model
from training.weight_interpolation import average_states, interpolate_states


def _two_states():
    torch.manual_seed(0)
    start, end = build_model("resnet20", num_classes=10), build_model("resnet20", num_classes=10)
    with torch.no_grad():  # BatchNorm statistics differ too, as after fine-tuning
        for m in end.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return start.state_dict(), end.state_dict()


def test_the_ends_are_the_two_weight_sets_bit_for_bit():
    start, end = _two_states()
    at_one = interpolate_states(start, end, 1.0)
    assert all(torch.equal(at_one[k], end[k]) for k in end)
    at_zero = interpolate_states(start, end, 0.0)
    assert all(torch.equal(at_zero[k], start[k]) for k in start if start[k].is_floating_point())


def test_between_the_ends_every_float_tensor_is_mixed_and_counters_come_from_fine_tuning():
    start, end = _two_states()
    got = interpolate_states(start, end, 0.25)
    key = "layer1.0.bn1.running_mean"
    assert not torch.equal(start[key], end[key])
    for name, value in got.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.75 * start[name] + 0.25 * end[name])
        else:
            assert torch.equal(value, end[name]) and value.dtype == end[name].dtype
    assert got["layer1.0.bn1.num_batches_tracked"].item() == 7


def test_weight_sets_of_different_networks_or_a_bad_alpha_are_refused():
    start, end = _two_states()
    other = build_model("resnet20", num_classes=100).state_dict()
    with pytest.raises(ValueError, match="linear.weight: shape"):
        interpolate_states(start, other, 0.5)
    with pytest.raises(ValueError, match="different tensors"):
        interpolate_states({k: v for k, v in start.items() if k != "linear.bias"}, end, 0.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        interpolate_states(start, end, 1.5)


def test_average_is_the_mean_of_every_float_tensor_and_of_two_the_midpoint():
    start, end = _two_states()
    torch.manual_seed(1)
    third = build_model("resnet20", num_classes=10).state_dict()
    got = average_states([start, end, third])
    for name, value in got.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (start[name] + end[name] + third[name]) / 3)
        else:
            assert torch.equal(value, third[name])
    two = average_states([start, end])
    half = interpolate_states(start, end, 0.5)
    assert all(torch.equal(two[k], half[k]) for k in half)
    one = average_states([end])
    assert all(torch.equal(one[k], end[k]) for k in end)


def test_averaging_nothing_or_weight_sets_of_different_networks_is_refused():
    start, end = _two_states()
    with pytest.raises(ValueError, match="at least one"):
        average_states([])
    other = build_model("resnet20", num_classes=100).state_dict()
    with pytest.raises(ValueError, match="linear.weight: shape .* in weight set 2 vs"):
        average_states([start, other, end])
