"""Loss values against hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from trainer.losses import ppo_clip_loss, rwr_loss, rwr_weights, score_function_loss


def test_ppo_clip_loss_hand_computed():
    adv = torch.tensor([1.0, -2.0, 10.0])  # 10 is clipped to 5
    old = torch.zeros(3)
    new = torch.tensor([math.log(1.5), math.log(1.5), math.log(0.5)])  # ratios 1.5, 1.5, 0.5
    loss, info = ppo_clip_loss(adv, new, old, clip_range=0.2, adv_clip_max=5.0)
    # sample 0: max(-1*1.5, -1*1.2) = -1.2 ; sample 1: max(2*1.5, 2*1.2) = 3.0 ;
    # sample 2 (A=5): max(-5*0.5, -5*0.8) = -2.5
    assert loss.item() == pytest.approx((-1.2 + 3.0 - 2.5) / 3, rel=1e-6)
    assert info.clipfrac == pytest.approx(1.0)
    expected_kl = 0.5 * (2 * math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3
    assert info.approx_kl == pytest.approx(expected_kl, rel=1e-6)


def test_ppo_gradient_is_zero_where_clipped_and_advantage_weighted_elsewhere():
    adv = torch.tensor([1.0, 1.0])
    new = torch.tensor([math.log(1.5), 0.0], requires_grad=True)
    loss, info = ppo_clip_loss(adv, new, torch.zeros(2), clip_range=0.2, adv_clip_max=5.0)
    loss.backward()
    # sample 0 is clipped (ratio 1.5 > 1.2 with A > 0): no gradient; sample 1: d/dlogp(-A r / 2) = -0.5
    assert new.grad.tolist() == pytest.approx([0.0, -0.5])
    assert info.clipfrac == pytest.approx(0.5)


def test_on_policy_ratio_is_one():
    logp = torch.tensor([-1.0, -2.0])
    loss, info = ppo_clip_loss(torch.tensor([1.0, -1.0]), logp, logp.clone(), 1e-4, 5.0)
    assert info.ratio_mean == 1.0 and info.approx_kl == 0.0 and info.clipfrac == 0.0
    assert loss.item() == pytest.approx(0.0)


def test_score_function_loss():
    adv = torch.tensor([2.0, -1.0, -9.0])
    new = torch.tensor([-1.0, -3.0, -0.5], requires_grad=True)
    loss, _ = score_function_loss(adv, new, new.detach(), adv_clip_max=5.0)
    assert loss.item() == pytest.approx((2.0 - 3.0 - 2.5) / 3)
    loss.backward()
    assert new.grad.tolist() == pytest.approx([-2 / 3, 1 / 3, 5 / 3])


def test_rwr_softmax_weights():
    rewards = np.array([0.0, 1.0, 2.0])
    w = rwr_weights(rewards, "softmax", temperature=0.5, percentile=0.9)
    z = (rewards - 1.0) / (np.sqrt(2 / 3) + 1e-6) / 0.5
    e = np.exp(z)
    np.testing.assert_allclose(w, 3 * e / e.sum())
    assert w.mean() == pytest.approx(1.0)


def test_rwr_filter_weights():
    w = rwr_weights(np.arange(10.0), "filter", temperature=1.0, percentile=0.8)
    # quantile 0.8 of 0..9 is 7.2: keep 8 and 9, mean weight 1
    np.testing.assert_allclose(w, [0] * 8 + [5.0, 5.0])


def test_rwr_loss():
    pred = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    noise = torch.zeros(2, 2)
    loss = rwr_loss(pred, noise, torch.tensor([2.0, 0.5]))
    assert loss.item() == pytest.approx((2.0 * 1.0 + 0.5 * 2.0) / 2)
