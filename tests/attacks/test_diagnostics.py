"""Gradient-masking diagnostics: each check fires on the pattern it names and not on noise."""

import warnings

import numpy as np
import pytest

from certjax.attacks import diagnostics


def _pair(n, only_a, only_b, both_robust):
  """Masks (a_robust, b_robust) with given discordant counts."""
  a = np.zeros(n, bool)
  b = np.zeros(n, bool)
  a[:only_a] = True                                   # robust to a, broken by b
  b[only_a:only_a + only_b] = True                    # robust to b, broken by a
  a[only_a + only_b:only_a + only_b + both_robust] = True
  b[only_a + only_b:only_a + only_b + both_robust] = True
  return a, b


def test_black_box_beats_white_box_fires_on_a_real_gap_only():
  white, black = _pair(500, only_a=40, only_b=2, both_robust=300)
  finding = diagnostics.black_box_beats_white_box(white, black)
  assert finding is not None and finding.name == "black_box_beats_white_box"
  assert finding.evidence["broken_only_by_black_box"] == 40
  assert finding.evidence["p_value"] < 1e-6
  # A symmetric disagreement (sampling noise between two attacks) is no finding.
  white, black = _pair(500, only_a=6, only_b=5, both_robust=300)
  assert diagnostics.black_box_beats_white_box(white, black) is None
  # Significant but below the minimum effect size.
  white, black = _pair(5000, only_a=40, only_b=0, both_robust=3000)
  assert diagnostics.black_box_beats_white_box(white, black, min_gap=0.02) is None
  assert diagnostics.black_box_beats_white_box(white, black, min_gap=0.005) is not None


def test_one_step_beats_iterative():
  iterative, one_step = _pair(300, only_a=30, only_b=1, both_robust=100)
  finding = diagnostics.one_step_beats_iterative(iterative, one_step)
  assert finding is not None and "one_step breaks 30 of 300" in finding.message
  assert diagnostics.one_step_beats_iterative(one_step, iterative) is None


def test_large_eps_randomness_and_zero_gradients():
  robust = np.zeros(200, bool)
  robust[:20] = True
  assert diagnostics.accuracy_not_zero_at_large_eps(robust, 0.5).evidence[
      "robust_accuracy"] == pytest.approx(0.1)
  assert diagnostics.accuracy_not_zero_at_large_eps(robust[20:], 0.5) is None
  same = np.tile(np.arange(10), (3, 1))
  assert diagnostics.randomness_across_evaluations(same) is None
  changed = same.copy()
  changed[2, 3] = 7
  assert diagnostics.randomness_across_evaluations(changed).evidence[
      "fraction_changed"] == pytest.approx(0.1)
  norms = np.ones(100)
  assert diagnostics.zero_gradients(norms) is None
  norms[:30] = 0.0
  assert diagnostics.zero_gradients(norms).evidence["fraction_zero"] == pytest.approx(0.3)


def test_diagnose_runs_the_checks_it_has_inputs_for_and_warns():
  white, black = _pair(400, only_a=50, only_b=0, both_robust=200)
  found = diagnostics.diagnose({"white_box_robust": white, "black_box_robust": black,
                                "gradient_norms": np.ones(400)})
  assert [f.name for f in found] == ["black_box_beats_white_box"]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    diagnostics.warn(found, "jpeg")
  assert len(caught) == 1 and issubclass(caught[0].category,
                                         diagnostics.GradientMaskingWarning)
  assert "[black_box_beats_white_box] jpeg:" in str(caught[0].message)


@pytest.mark.parametrize("outcomes, match", [
    ({"white_box_robust": np.ones(3, bool)}, "both"),
    ({"nonsense": 1}, "Unknown outcome"),
    ({"predictions": np.zeros((1, 4))}, "R >= 2"),
    ({"gradient_norms": np.array([np.nan])}, "finite"),
])
def test_bad_input(outcomes, match):
  with pytest.raises(ValueError, match=match):
    diagnostics.diagnose(outcomes)


def test_mismatched_sizes():
  with pytest.raises(ValueError, match="entries"):
    diagnostics.black_box_beats_white_box(np.ones(3, bool), np.ones(4, bool))
