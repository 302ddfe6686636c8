"""The width power law Loss = C·N^-β + D is recovered from synthetic curves."""

import numpy as np
import pytest

from lightning_mup.report.fit import fit_power_law


@pytest.mark.parametrize(("c", "beta", "d"), [(3.0, 0.7, 0.2), (10.0, 1.3, 0.05), (1.0, 0.3, 1.0), (0.5, 2.0, 0.01)])
def test_recovers_known_parameters_to_1_percent(c, beta, d):
    widths = np.array([32, 64, 128, 256, 512, 1024, 2048], dtype=float)
    law = fit_power_law(widths, c * widths**-beta + d)
    assert pytest.approx(c, rel=1e-2) == law.C
    assert law.beta == pytest.approx(beta, rel=1e-2)
    assert pytest.approx(d, rel=1e-2) == law.D
    assert law.r2 > 0.9999


def test_noisy_curves_still_fit_and_report_r2():
    rng = np.random.default_rng(0)
    widths = np.array([64, 128, 256, 512, 1024], dtype=float)
    losses = (2.0 * widths**-0.8 + 0.1) * (1 + 0.01 * rng.standard_normal(5))
    law = fit_power_law(widths, losses)
    assert law.beta == pytest.approx(0.8, rel=0.15)
    assert 0.95 < law.r2 <= 1.0


def test_needs_three_widths():
    with pytest.raises(ValueError, match="three widths"):
        fit_power_law([64, 128], [1.0, 0.5])
