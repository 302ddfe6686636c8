"""An ensemble's distance to a noisy reference (an infinite-width limit with its Monte Carlo error), with both
sides' sampling noise removed, and the widths over which it stands clear of that noise."""

import numpy as np

from lightning_mup.measure.ensemble import distance_to_reference, resolved_widths


def test_the_bias_is_recovered_once_both_sides_noise_is_removed():
    """Members = truth + bias + noise of known size, the reference = truth + its own noise of known variance: the
    raw distance overstates the bias (it holds the noise), the noise-removed one recovers it to a few percent."""
    rng = np.random.default_rng(0)
    points, members, bias, spread, reference_sd = 2000, 64, 0.02, 0.2, 0.01
    truth = rng.normal(size=points)
    ensemble = truth + bias + spread * rng.normal(size=(members, points))
    reference = truth + reference_sd * rng.normal(size=points)
    distance, estimate, noise = distance_to_reference(ensemble, reference, reference_sd**2)
    expected_noise = np.sqrt(spread**2 / members + reference_sd**2)
    assert abs(noise / expected_noise - 1) < 0.05
    assert distance > 1.2 * bias
    assert abs(estimate / bias - 1) < 0.1, estimate


def test_widths_are_resolved_from_the_narrowest_until_the_noise_and_a_late_fluke_is_not():
    """A bias 0.1/N over noise 1e-4: clear at 16 … 128 (10× … 8×), at the noise from 512 on. A single number
    1.8σ off at 2048 passes 'bias > noise' (distance² > 2·noise²) but is neither past the 1% χ²₁ threshold nor
    contiguous with the resolved widths; a 40-entry vector needs only distance² > 2·noise²."""
    noise = 1e-4
    distances = {}
    for width, distance in ((16, 6e-3), (32, 3e-3), (64, 1.5e-3), (128, 8e-4), (512, 1.1e-4), (2048, 1.8e-4)):
        bias = np.sqrt(distance**2 - noise**2) if distance > noise else np.nan
        distances[width] = (distance, bias, noise)
    assert list(resolved_widths(distances, entries=1)) == [16, 32, 64, 128]
    marginal = {16: (2.2e-4, np.sqrt(2.2e-4**2 - 1e-8), 1e-4)}  # 2.2σ: a fluke for one number, clear for 40
    assert resolved_widths(marginal, entries=1) == {}
    assert list(resolved_widths(marginal, entries=40)) == [16]
