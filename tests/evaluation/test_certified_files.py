"""Certification TSV files (Cohen et al.'s format), summary tables and plots."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from certjax import smoothing
from certjax.evaluation import certified
from certjax.evaluation import plots
from certjax.smoothing import analysis

# As Cohen et al.'s certify.py writes it: radius with 3 significant digits,
# time as a timedelta string.
COHEN_TSV = (
    "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
    "0\t3\t3\t0.61\t1\t0:00:02.113452\n"
    "20\t8\t8\t1.23\t1\t0:00:01.5\n"
    "40\t0\t-1\t0.0\t0\t0:01:00\n"
    "60\t6\t2\t0.312\t0\t1 day, 0:00:00\n"
)


def test_reads_cohen_format(tmp_path):
  path = tmp_path / "cohen.tsv"
  path.write_text(COHEN_TSV)
  results = certified.read_tsv(path)
  np.testing.assert_array_equal(results.idx, [0, 20, 40, 60])
  np.testing.assert_array_equal(results.predict, [3, 8, -1, 2])
  np.testing.assert_allclose(results.radius, [0.61, 1.23, 0.0, 0.312])
  np.testing.assert_array_equal(results.correct, [True, True, False, False])
  np.testing.assert_allclose(results.time, [2.113452, 1.5, 60.0, 86400.0])


def test_round_trip_and_summary(tmp_path):
  cert = smoothing.certificate_from_counts(
      [[9, 1], [1, 9], [5, 5], [10, 0]],
      [[990, 10], [100, 900], [500, 500], [1000, 0]], sigma=0.5, alpha=0.001)
  labels = np.array([0, 1, 0, 1])
  results = analysis.make_results(labels, cert.prediction, cert.radius, idx=[5, 6, 7, 8],
                                  time=1.25)
  path = tmp_path / "ours.tsv"
  certified.write_tsv(path, results)
  assert path.read_text().splitlines()[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime"
  back = certified.read_tsv(path)
  for name in ("idx", "label", "predict", "correct"):
    np.testing.assert_array_equal(getattr(back, name), getattr(results, name))
  np.testing.assert_allclose(back.radius, results.radius, rtol=1e-5)
  np.testing.assert_allclose(back.time, 1.25)

  summary = analysis.summarize(back, thresholds=[0.0, 0.5, 0.75])
  # Correct and certified: rows 0 (r~0.99) and 1 (r~0.56); row 2 abstains, row 3 wrong.
  np.testing.assert_allclose(summary.certified_accuracy, [0.5, 0.5, 0.25])
  assert summary.abstain_rate == 0.25
  expected_acr = (results.radius[0] + results.radius[1]) / 4
  assert summary.average_certified_radius == pytest.approx(expected_acr, rel=1e-5)
  table = analysis.format_summary({"sigma=0.5": summary})
  assert "| sigma=0.5 | 0.500 | 0.500 | 0.250 |" in table
  assert "r=0.75" in table.splitlines()[0]
  np.testing.assert_allclose(analysis.default_thresholds(back), [0, 0.25, 0.5, 0.75, 1.0, 1.25])


def test_plot_draws_every_curve_and_the_radius_cap(tmp_path):
  rng = np.random.default_rng(0)
  runs = {f"sigma={s}": analysis.make_results(np.zeros(50, int), rng.integers(-1, 2, 50),
                                              rng.uniform(0, s * 3, 50))
          for s in (0.25, 0.5)}
  cap = smoothing.max_certifiable_radius(0.5, 1000, 0.001)
  fig = plots.certified_accuracy_figure(runs, radius_caps={"cap": cap}, title="test")
  (ax,) = fig.axes
  labels = [line.get_label() for line in ax.get_lines()]
  assert labels == ["sigma=0.25", "sigma=0.5", "cap"]
  # The cap is a vertical line at sigma * Phi^-1(alpha ** (1 / n)) (Cohen et al.).
  np.testing.assert_allclose(ax.get_lines()[2].get_xdata(), [cap, cap])
  assert cap == pytest.approx(0.5 * scipy_stats.norm.ppf(0.001 ** (1 / 1000)), rel=1e-9)
  # The curves are the certified accuracies of their runs.
  grid, curve = ax.get_lines()[1].get_data()
  r = runs["sigma=0.5"]
  np.testing.assert_allclose(curve, smoothing.certified_accuracy(r.radius, r.correct, grid))
  path = tmp_path / "curve.png"
  fig.savefig(path)
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_bad_files(tmp_path):
  bad_header = tmp_path / "a.tsv"
  bad_header.write_text("idx,label,predict\n")
  with pytest.raises(ValueError, match="tab-separated header"):
    certified.read_tsv(bad_header)
  short_row = tmp_path / "b.tsv"
  short_row.write_text(COHEN_TSV + "7\t1\t1\n")
  with pytest.raises(ValueError, match="line 6: expected 6 tab-separated fields"):
    certified.read_tsv(short_row)
  bad_time = tmp_path / "c.tsv"
  bad_time.write_text(COHEN_TSV.replace("0:01:00", "one minute"))
  with pytest.raises(ValueError, match="time 'one minute'"):
    certified.read_tsv(bad_time)
  with pytest.raises(ValueError, match="predict has 2 entries but label has 3"):
    analysis.make_results([0, 1, 2], [0, 1], [0.1, 0.2, 0.3])
