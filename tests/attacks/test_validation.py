"""Public entry points reject bad input with messages naming the problem.

Eagerly always; under jit / vmap through the checked path
(`checked=True` + `attacks.checked`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from certjax import attacks, validation
from certjax.attacks import eot
from tests.attacks.conftest import fast_jit

KEY = jax.random.key(0)
X = np.full((4, 7, 7, 1), 0.5, np.float32)
Y = np.array([0, 1, 2, 3], np.int32)
W = jnp.asarray(np.random.default_rng(0).normal(size=(49, 10)), jnp.float32)


def model(x):
  return x.reshape(x.shape[0], -1) @ W


GRADIENT_ATTACKS = [attacks.fgm, attacks.pgd, attacks.mi_fgsm, attacks.apgd,
                    attacks.apgd_targeted, attacks.square, attacks.fab, attacks.fab_targeted]


@pytest.mark.parametrize("attack", GRADIENT_ATTACKS, ids=lambda a: a.__name__)
def test_common_input_errors(attack):
  def call(x=X, y=Y, **kwargs):
    return attack(KEY, model, x, y, **{"eps": 0.1, **kwargs})

  with pytest.raises(ValueError, match="eps must be a finite number >= 0, got -0.1"):
    call(eps=-0.1)
  with pytest.raises(ValueError, match="Unknown norm 'l3'. Accepted values: 'linf', 'l2'"):
    call(norm="l3")
  bad = X.copy()
  bad[0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match=r"x contains 1 NaN and 0 Inf value\(s\) \(the first "
                     r"in example 0\); images must be finite pixel values in \[0.0, 1.0\]"):
    call(x=bad)
  with pytest.raises(ValueError, match=r"x must lie in \[0.0, 1.0\] pixel space; got values in \[255, 255\]"):
    call(x=X * 510)
  with pytest.raises(ValueError, match=r"labels in \[0, 10\] but must lie in \[0, 9\] for 10"):
    call(y=np.array([0, 1, 2, 10]))
  with pytest.raises(ValueError, match="y has 3 labels but the batch has 4"):
    call(y=Y[:3])
  with pytest.raises(ValueError, match="must have rank 4"):
    call(x=X[0])
  with pytest.raises(ValueError, match=r"eps must be a scalar or have one value per example"):
    call(eps=np.full(3, 0.1))


def test_attack_specific_errors():
  with pytest.raises(ValueError, match="either step_size .* or rel_step_size"):
    attacks.pgd(KEY, model, X, Y, eps=0.1, step_size=0.01, rel_step_size=0.1)
  with pytest.raises(ValueError, match="num_steps must be an integer >= 1, got 0"):
    attacks.pgd(KEY, model, X, Y, eps=0.1, num_steps=0)
  with pytest.raises(ValueError, match="Unknown schedule 'linear'.*'cosine'"):
    attacks.pgd(KEY, model, X, Y, eps=0.1, schedule="linear")
  with pytest.raises(ValueError, match="Unknown keep 'best'"):
    attacks.pgd(KEY, model, X, Y, eps=0.1, keep="best")
  with pytest.raises(ValueError, match=r"target holds labels in \[0, 12\]"):
    attacks.pgd(KEY, model, X, Y, eps=0.1, target=np.array([0, 1, 2, 12]))
  with pytest.raises(ValueError, match=r"rho must lie in the open interval \(0.0, 1.0\)"):
    attacks.apgd(KEY, model, X, Y, eps=0.1, rho=1.5)
  two_classes = lambda x: x.reshape(x.shape[0], -1)[:, :2]
  with pytest.raises(ValueError, match="untargeted DLR loss needs at least 3 classes"):
    attacks.apgd(KEY, two_classes, X, Y % 2, eps=0.1, loss="dlr")
  three_classes = lambda x: x.reshape(x.shape[0], -1)[:, :3]
  with pytest.raises(ValueError, match="targeted DLR loss needs at least 4 classes.*has 3"):
    attacks.apgd_targeted(KEY, three_classes, X, Y % 3, eps=0.1)
  with pytest.raises(ValueError, match="Unknown norm 'l1'. Accepted values: 'linf', 'l2'."):
    attacks.square(KEY, model, X, Y, eps=0.1, norm="l1")
  with pytest.raises(ValueError, match=r"p_init must lie in the open interval"):
    attacks.square(KEY, model, X, Y, eps=0.1, p_init=1.5)
  with pytest.raises(ValueError, match=r"logits of shape \(4, num_classes\); got \(4, 7, 7\)"):
    attacks.fgsm(KEY, lambda x: x[..., 0], X, Y, eps=0.1)
  with pytest.raises(TypeError, match="logits_fn must be a callable"):
    attacks.fgsm(KEY, "model", X, Y, eps=0.1)
  with pytest.raises(ValueError, match="must be a floating-point array"):
    attacks.fgsm(KEY, model, (X * 255).astype(np.uint8), Y, eps=0.1)


def test_factories_validate_at_construction():
  with pytest.raises(ValueError, match="Unknown norm 'L2'"):
    attacks.make_pgd(norm="L2")
  with pytest.raises(ValueError, match="Unknown loss 'dlr'. Accepted values: 'margin', 'ce'"):
    attacks.make_square(loss="dlr")
  with pytest.raises(ValueError, match="num_target_classes must be an integer >= 1"):
    attacks.make_apgd_targeted(num_target_classes=0)
  with pytest.raises(ValueError, match="decay must be a finite number >= 0"):
    attacks.make_mi_fgsm(decay=-1.0)
  with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
    eot.eot(lambda k, x: model(x), 0)
  with pytest.raises(ValueError, match=r"chunk_size \(3\) must divide num_samples \(8\)"):
    eot.eot(lambda k, x: model(x), 8, chunk_size=3)


def test_runner_input_errors():
  ok = [("fgsm", attacks.make_fgm())]
  run = lambda **kw: attacks.robust_accuracy(KEY, model, **{
      "x": X, "y": Y, "attacks": ok, "eps_list": [0.1], "norm": "linf", **kw})
  with pytest.raises(ValueError, match="eps_list must be a non-empty sequence"):
    run(eps_list=[])
  with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
    run(eps_list=[0.1, -0.1])
  with pytest.raises(ValueError, match=r"attacks\[0\] must be a \(name, attack_fn\) pair"):
    run(attacks=[attacks.make_fgm()])
  with pytest.raises(ValueError, match="attacks must be a non-empty sequence"):
    run(attacks=[])
  with pytest.raises(ValueError, match="Attack names must be unique"):
    run(attacks=ok + ok)
  with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
    run(batch_size=0)
  with pytest.raises(ValueError, match="Unknown norm 'Linf'"):
    run(norm="Linf")
  with pytest.raises(ValueError, match="y has 3 labels but the batch has 4"):
    run(y=Y[:3])
  with pytest.raises(ValueError, match=r"must lie in \[0, 9\] for 10 classes"):
    run(y=Y + 7)


def test_check_images_reports_nan_and_inf_apart_from_the_range():
  x = np.full((3, 2, 2, 1), 0.5, np.float32)
  x[1, 0, 0, 0], x[2, 1, 0, 0], x[2, 1, 1, 0] = np.nan, np.inf, -np.inf
  with pytest.raises(ValueError, match=r"x contains 1 NaN and 2 Inf value\(s\) \(the first in "
                     r"example 1\); images must be finite pixel values in \[0.0, 1.0\]\.$"):
    validation.check_images(x)
  with pytest.raises(ValueError, match=r"images must be finite\.$"):
    validation.check_images(x, value_range=None)
  # With non-finite values allowed, the range applies to the finite values:
  # no error here, and the finite extremes (not nan / inf) when out of range.
  validation.check_images(x, require_finite=False)
  x[0, 0, 0, 0] = 3.0
  with pytest.raises(ValueError, match=r"got values in \[0.5, 3\]\."):
    validation.check_images(x, require_finite=False)


def checked_fast_jit(fn):
  """`attacks.checked(jax.jit(fn))` for fast_jit, whose compiler options only a
  top-level jit accepts: the checkify-outside form of the same thing."""
  run = fast_jit(checkify.checkify(fn, errors=checkify.user_checks))

  def call(*args):
    error, out = run(*args)
    error.throw()
    return out
  return call


# Tiny configurations: the checked tests compile each attack twice (with and
# without checks), and compile time dominates.
CHECKED_ROWS = [
    ("fgsm", attacks.fgsm, {}),
    ("pgd", attacks.pgd, {"num_steps": 2}),
    ("mi_fgsm", attacks.mi_fgsm, {"num_steps": 2}),
    ("apgd", attacks.apgd, {"num_steps": 2}),
    ("apgd_targeted", attacks.apgd_targeted, {"num_steps": 2, "num_target_classes": 2}),
    ("square", attacks.square, {"num_queries": 3}),
    ("fab_targeted", attacks.fab_targeted, {"num_steps": 2, "num_target_classes": 2}),
]


@pytest.mark.parametrize("attack,config", [row[1:] for row in CHECKED_ROWS],
                         ids=[row[0] for row in CHECKED_ROWS])
def test_checked_path_raises_under_jit(attack, config):
  def run(key, x, y, eps, checked):
    return attack(key, model, x, y, eps=eps, checked=checked, **config)

  unchecked = fast_jit(lambda *args: run(*args, checked=False))
  safe = checked_fast_jit(lambda *args: run(*args, checked=True))
  eps = np.float32(0.1)
  nan = X.copy()
  nan[2, 3, 4, 0] = np.nan
  with pytest.raises(ValueError, match=r"x contains 1 NaN and 0 Inf value\(s\) \(the first "
                     r"in example 2\); images must be finite pixel values in \[0.0, 1.0\]"):
    safe(KEY, nan, Y, eps)
  with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got -0.1\."):
    safe(KEY, X, Y, np.float32(-0.1))
  with pytest.raises(ValueError, match=r"x must lie in \[0.0, 1.0\] pixel space; got values "
                     r"in \[1.5, 1.5\]"):
    safe(KEY, X * 3, Y, eps)
  with pytest.raises(ValueError, match=r"y holds labels in \[7, 10\] but must lie in \[0, 9\]"):
    safe(KEY, X, Y + 7, eps)
  # Valid input: the checks leave the result alone, and the unchecked
  # program still runs (and, unlike the checked one, lets NaN through).
  np.testing.assert_array_equal(safe(KEY, X, Y, eps), unchecked(KEY, X, Y, eps))
  assert not np.all(np.isfinite(unchecked(KEY, nan, Y, eps)))


def test_checked_path_under_vmap_and_for_traced_settings():
  def run(x, y, eps, step_size, rho, decay):
    return (attacks.pgd(KEY, model, x, y, eps=eps, num_steps=1, step_size=step_size,
                        checked=True),
            attacks.apgd(KEY, model, x, y, eps=eps, num_steps=1, rho=rho, checked=True),
            attacks.mi_fgsm(KEY, model, x, y, eps=eps, num_steps=1, decay=decay,
                            checked=True))

  safe = checked_fast_jit(jax.vmap(run, in_axes=(0, 0, 0, None, None, None)))
  xs, ys = np.stack([X, X]), np.stack([Y, Y])
  good = (np.float32(0.01), np.float32(0.75), np.float32(1.0))
  pgd_x, _, _ = safe(xs, ys, np.array([0.1, 0.2], np.float32), *good)
  assert pgd_x.shape == xs.shape
  with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got -0.2\."):
    safe(xs, ys, np.array([0.1, -0.2], np.float32), *good)
  with pytest.raises(ValueError, match=r"step_size must be a finite number > 0, got 0\."):
    safe(xs, ys, np.array([0.1, 0.2], np.float32), np.float32(0.0), *good[1:])
  with pytest.raises(ValueError, match=r"rho must lie in the open interval \(0.0, 1.0\), got 1\.5"):
    safe(xs, ys, np.array([0.1, 0.2], np.float32), good[0], np.float32(1.5), good[2])
  with pytest.raises(ValueError, match=r"decay must be a finite number >= 0, got nan"):
    safe(xs, ys, np.array([0.1, 0.2], np.float32), *good[:2], np.float32(np.nan))
  # A per-example eps names the offending example; the library's helper
  # around a plain jax.jit.
  per_example = attacks.checked(jax.jit(lambda eps: attacks.fgsm(KEY, model, X, Y, eps=eps,
                                                                 checked=True)))
  assert per_example(np.array([0.1, 0.2, 0.3, 0.4], np.float32)).shape == X.shape
  with pytest.raises(ValueError, match=r"got -0.3 \(index 2\)"):
    per_example(np.array([0.1, 0.2, -0.3, 0.4], np.float32))


def test_checked_path_for_the_patch_entry_points():
  train = checked_fast_jit(lambda x, y: attacks.train_patch(
      KEY, model, x, y=y, patch_size=2, num_steps=1, checked=True))
  rate = checked_fast_jit(lambda x, y: attacks.patch_success_rate(
      KEY, model, x, np.full((2, 2, 1), 0.5, np.float32), y=y, num_placements=1,
      checked=True))
  nan = X.copy()
  nan[1, 0, 0, 0] = np.nan
  for fn in (train, rate):
    assert np.isfinite(fn(X, Y)).all()
    with pytest.raises(ValueError, match=r"x contains 1 NaN and 0 Inf value\(s\)"):
      fn(nan, Y)
    with pytest.raises(ValueError, match=r"x must lie in \[0.0, 1.0\] pixel space"):
      fn(X - 1.0, Y)
    with pytest.raises(ValueError, match=r"y holds labels in \[0, 12\] but must lie in \[0, 9\]"):
      fn(X, Y * 4)


def test_the_unchecked_path_adds_nothing_and_checked_needs_checkify():
  def jaxpr(checked):
    return str(jax.make_jaxpr(lambda x, y, eps: attacks.pgd(
        KEY, model, x, y, eps=eps, num_steps=1, checked=checked))(X, Y, np.float32(0.1)))

  assert " check[" not in jaxpr(False) and "is_finite" not in jaxpr(False)
  assert " check[" in jaxpr(True)
  # Staging checks without checkify is refused rather than silently dropped.
  with pytest.raises(ValueError, match="not functionalized"):
    jax.jit(lambda eps: attacks.fgsm(KEY, model, X, Y, eps=eps, checked=True))(0.1)
  # Eagerly, checked=True needs no checkify: the NumPy checks run.
  with pytest.raises(ValueError, match="eps must be a finite number >= 0, got -0.1"):
    attacks.fgsm(KEY, model, X, Y, eps=-0.1, checked=True)
