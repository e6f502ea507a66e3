import numpy as np
import pytest

from trainer.stat_tracking import PerPromptStatTracker, normalize_globally


def test_uses_batch_statistics_below_min_count():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    rewards = np.array([1.0, 2.0, 3.0, 6.0])
    adv = tracker.update(["a", "a", "b", "b"], rewards)
    # batch mean 3, population std sqrt(((-2)^2 + (-1)^2 + 0 + 3^2) / 4) = sqrt(3.5)
    expected = (rewards - 3.0) / (np.sqrt(3.5) + 1e-6)
    np.testing.assert_allclose(adv, expected)


def test_uses_prompt_buffer_once_full_enough():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=3)
    tracker.update(["a", "a"], np.array([0.0, 2.0]))
    # "a" now holds [0, 2, 4]: mean 2, population std sqrt(8/3); "b" has 1 < 3: batch stats.
    adv = tracker.update(["a", "b"], np.array([4.0, 10.0]))
    assert adv[0] == pytest.approx((4.0 - 2.0) / (np.sqrt(8 / 3) + 1e-6))
    assert adv[1] == pytest.approx((10.0 - 7.0) / (3.0 + 1e-6))


def test_buffer_keeps_only_the_last_rewards():
    tracker = PerPromptStatTracker(buffer_size=2, min_count=2)
    tracker.update(["a"] * 3, np.array([100.0, 1.0, 3.0]))  # buffer [1, 3]
    adv = tracker.update(["a"], np.array([5.0]))  # buffer [3, 5]: mean 4, std 1
    assert adv[0] == pytest.approx(1.0 / (1.0 + 1e-6))


def test_state_roundtrip_and_shape_errors():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=1)
    tracker.update(["x", "y"], np.array([1.0, 2.0]))
    other = PerPromptStatTracker(buffer_size=4, min_count=1)
    other.load_state_dict(tracker.state_dict())
    r = np.array([3.0, 4.0])
    np.testing.assert_array_equal(other.update(["x", "y"], r), tracker.update(["x", "y"], r))
    with pytest.raises(ValueError):
        tracker.update(["x"], np.array([1.0, 2.0]))


def test_batch_of_one_keeps_its_shape():
    adv = PerPromptStatTracker(4, 1).update(["solo"], np.array([2.5]))
    assert adv.shape == (1,) and adv[0] == 0.0


def test_global_normalization():
    r = np.array([1.0, 3.0])
    np.testing.assert_allclose(normalize_globally(r), [-1 / (1 + 1e-6), 1 / (1 + 1e-6)])
