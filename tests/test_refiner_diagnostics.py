"""Refiner diagnostics on offsets with a known answer."""

from __future__ import annotations

import pytest
import torch

from prompt_robust.addons.refiner.diagnostics import label_decodability, nearest_class_mean, prediction_agreement


def test_one_hot_offsets_are_fully_label_decodable():
    labels = torch.arange(5).repeat(4)  # 4 samples per class
    offsets = torch.nn.functional.one_hot(labels, 5).float().view(20, 1, 5) * 3.0  # (N, n_tokens, dim)
    assert label_decodability(offsets, labels) == 1.0
    # a little noise on top does not hide the label
    noisy = offsets + 0.1 * torch.randn(offsets.shape, generator=torch.Generator().manual_seed(0))
    assert label_decodability(noisy, labels) == 1.0


def test_random_offsets_decode_at_chance_and_leave_one_out_is_real():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(400)
    offsets = torch.randn(len(labels), 2, 8, generator=g)
    assert label_decodability(offsets, labels) == pytest.approx(0.25, abs=0.05)
    # two samples per class in 512 dimensions: with itself in its class mean every sample would decode (1.0);
    # left out, nothing does better than chance
    labels = torch.arange(50).repeat(2)
    offsets = torch.randn(100, 512, generator=g)
    x = offsets
    means = torch.stack([x[labels == c].mean(0) for c in range(50)])
    assert (torch.cdist(x, means).argmin(1) == labels).float().mean() == 1.0
    assert label_decodability(offsets, labels) < 0.1


def test_single_sample_classes_cannot_be_decoded_to():
    offsets = torch.tensor([[0.0], [0.1], [5.0]])
    labels = torch.tensor([0, 0, 1])
    # sample 2 is alone in class 1: its left-out class mean does not exist, so it decodes to class 0 (wrong)
    assert label_decodability(offsets, labels) == pytest.approx(2 / 3)


def test_prediction_agreement_decodes_generated_offsets():
    train = torch.eye(3).repeat(2, 1)
    train_labels = torch.arange(3).repeat(2)
    generated = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.9, 0.1, 0]])
    assert nearest_class_mean(train, train_labels, generated).tolist() == [0, 1, 2, 0]
    assert prediction_agreement(train, train_labels, generated, torch.tensor([0, 1, 2, 0])) == 1.0
    assert prediction_agreement(train, train_labels, generated, torch.tensor([1, 1, 2, 2])) == 0.5
    # a class the learner predicts but no training offset has is never decoded
    assert prediction_agreement(train, train_labels, generated, torch.tensor([3, 3, 3, 3])) == 0.0


def test_diagnostic_errors_name_the_problem():
    with pytest.raises(ValueError, match="one label per offset"):
        label_decodability(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2"):
        label_decodability(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="one prediction per generated offset"):
        prediction_agreement(torch.eye(2), torch.tensor([0, 1]), torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
