"""Shared-context text features are encoded once for prediction and never served stale."""

from __future__ import annotations

import pytest
import torch
from conftest import CLASSNAMES, LEARNER_KWARGS

import prompt_robust as pr


def _counting(backbone):
    calls = []
    encode = backbone.encode_text

    def counted(*args, **kwargs):
        calls.append(1)
        return encode(*args, **kwargs)

    backbone.encode_text = counted
    return calls


@pytest.mark.parametrize("name", ["coop", "maple", "kgcoop"])
def test_prediction_encodes_the_class_prompts_once_and_follows_every_change(bb, images, name):
    torch.manual_seed(0)
    learner = pr.build_learner(name, bb, CLASSNAMES, **LEARNER_KWARGS.get(name, {}))
    learner.eval()
    calls = _counting(bb)
    try:
        with torch.no_grad():
            first = learner(images).logits
            assert learner(images).logits.equal(first) and len(calls) == 1  # the second batch reuses them
            param = next(p for p in learner.parameters() if p.requires_grad)
            param.add_(0.1)  # an optimizer step, in place
            moved = learner(images).logits
            assert len(calls) == 2 and not moved.equal(first)
        with torch.enable_grad():  # training: always encoded, with the graph
            fresh = learner(images).logits
        assert len(calls) == 3 and fresh.requires_grad
        torch.testing.assert_close(fresh.detach(), moved, rtol=0, atol=1e-6)
        learner.set_classnames(CLASSNAMES[:2])  # another class list: other features
        with torch.no_grad():
            assert learner(images).logits.shape[1] == 2 and len(calls) == 4
    finally:
        del bb.encode_text
