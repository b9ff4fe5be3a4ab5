r"""Witches' Brew crafting throughput against the victim's forward+backward, and its success rate.

Throughput (the default). For each model, on one batch of `--poisons` real
digits (the embedded 'mnist5k' train split, 28x28x1) and one target digit,
random weights, in one process and on one device:
  * fwd_bwd: one jitted jax.grad of the batch-mean cross-entropy in the
    PARAMETERS on the poison batch (a training step's forward+backward); the
    rate is poisons / s;
  * fwd_bwd_loop: `--steps` such passes chained in a `lax.fori_loop` (an SGD
    update between them, so XLA cannot hoist them): poisons x steps / s;
  * crafting_r1 / crafting_r8: `certjax.poisoning.crafting.gradient_matching`
    with num_steps=`--steps`, eps 16/255 and 1 or 8 restarts (the paper's R,
    run together under vmap); the rate counts poisons x steps x restarts / s.
    Each call also pays one target gradient and one final alignment
    evaluation (about two forward+backward passes of the batch);
  * ratio_to_fwd_bwd = crafting rate / fwd_bwd rate (ratio_to_fwd_bwd_loop:
    against the chained passes). A crafting step is a double backward pass
    (the gradient in the poisons of the cosine between parameter gradients),
    which costs about two to three forward+backward passes.
Models (`certjax.models.get_model`): `mlp` 784-256-10, `ibp_small` (conv 16
4x4 s2, conv 32 4x4 s1, dense 100, 10; Gowal et al.) and `ibp_small_im2col`
(the same with conv_impl='im2col'), all on 28x28x1. Timings alternate between
the functions over `--repeats` rounds (`common.interleaved_seconds`); medians
are reported with the load average at start and end (on a shared CPU the
absolute rates move with it).

    python -m benchmarks.poison_crafting --out=results/poison_crafting.json
    python -m benchmarks.poison_crafting --smoke      # a tiny run, nothing written

Reference (benchmarks/reference/cpu-2core/poison_crafting.json; 2 shared
cores, load average about 4.5, 32 poisons, 5 steps; 2.4 minutes): crafting
runs at 0.42-0.45x the MLP's forward+backward rate, 0.61-0.76x for
ibp_small_im2col, but 0.04-0.06x for ibp_small with flax's nn.Conv. The
cause is XLA:CPU (jaxlib 0.10.2) running convolutions inside a `while` loop
about 8-10x slower than the same convolutions outside one (fwd_bwd 2,508 vs
fwd_bwd_loop 335 examples/s here; unrolling the loop fully restores the
speed, `unroll=2` or 5 does not); im2col convolutions, being matrix
products, are unaffected. Every fori_loop attack pays this on CPU: use
conv_impl='im2col' there.

Success (`--success`, for the record; not a unit test): the paper's
from-scratch setting at MNIST scale. A 196-256-10 MLP (`get_model('mlp',
hidden=(256,))`) on the first `--train` mnist5k training digits average-
pooled to 14x14, trained with full-batch Adam (lr 1e-2, `--train-steps`
steps) from seed 0 is the surrogate. For each of `--targets` test digits the
surrogate classifies correctly (in order), an adversarial class is drawn
uniformly from the other nine (seeded, as the paper draws target and class at
random), `--budget` of the training set (1%: 20 of 2,000 images of that
class, the first ones) is perturbed with `gradient_matching` (eps per
`--eps`, 250 steps, 8 restarts, lr 0.1), and the victim is retrained from
scratch with the same recipe from `--victims` other inits (seeds 1, 2, ...,
the same for every target, so one clean retrain per seed is the control).
Success: a poisoned victim classifies the target as the adversarial class.

    python -m benchmarks.poison_crafting --success --no-throughput --targets=20 \
        --victims=3 --eps=0.0627451,0.1,0.2,0.3 --out=results/poison_success.json

Measured (2 shared CPU cores, load average about 5; 14.5 minutes), 20
targets x 3 victim inits, 1% budget (20 poisons), with `--targets=20
--victims=3 --eps=0.0627451,0.1,0.2,0.3`: (target, victim) pairs flipped to
the adversarial class at eps 16/255: 0/60; 0.1: 0/60; 0.2: 5/60 (3 of 20
targets in some victim); 0.3: 16/60 (6 of 20 targets). No clean retrain
predicted an adversarial class (0/60); the clean victims' test accuracy is
0.915-0.92. The paper's CIFAR-10 radius does not carry over to this MNIST
MLP; at the usual MNIST radius 0.3 about a quarter of the pairs flip.
Crafting takes about 1 s per target; retraining dominates.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import common

EPS = 16 / 255
RESTARTS = 8  # the paper's R
MODELS = ("mlp", "ibp_small", "ibp_small_im2col")
# MNIST statistics for the models' input normalisation.
MEAN, STD = (0.1307,), (0.3081,)


def _model(name: str):
  from certjax import models  # pylint: disable=import-outside-toplevel
  if name == "mlp":
    return models.get_model("mlp", num_classes=10, mean=MEAN, std=STD, hidden=(256,))
  if name == "ibp_small_im2col":
    return models.get_model("ibp_small", num_classes=10, mean=MEAN, std=STD,
                            conv_impl="im2col")
  return models.get_model(name, num_classes=10, mean=MEAN, std=STD)


def _loss_fn(module) -> Callable[..., Any]:
  import optax  # pylint: disable=import-outside-toplevel

  def loss_fn(params, images, labels):
    logits = module.apply({"params": params}, images, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return loss_fn


# ----------------------------------------------------------------------------
# Throughput.


def run_throughput(names: Sequence[str], poisons: int, steps: int,
                   repeats: int) -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax import lax  # pylint: disable=import-outside-toplevel

  from certjax import data as data_lib  # pylint: disable=import-outside-toplevel
  from certjax.poisoning import crafting  # pylint: disable=import-outside-toplevel

  x, y = data_lib.load_arrays({"name": "mnist5k"}, "train", 0, poisons + 1)
  xp, yp = jnp.asarray(x[:poisons]), jnp.asarray(y[:poisons])
  xt = jnp.asarray(x[poisons:])
  ya = (jnp.asarray(y[poisons:]) + 1) % 10
  results = {}
  for name in names:
    module = _model(name)
    params = module.init(jax.random.key(0), xp[:1])["params"]
    loss_fn = _loss_fn(module)

    grad = jax.jit(jax.grad(loss_fn))

    @jax.jit
    def fwd_bwd_loop(params, xp, yp, loss_fn=loss_fn):
      def body(_, p):
        g = jax.grad(loss_fn)(p, xp, yp)
        # Each pass depends on the last, so XLA cannot hoist it out of the loop.
        return jax.tree.map(lambda a, b: a - 1e-3 * b, p, g)
      return lax.fori_loop(0, steps, body, params)

    calls = {"fwd_bwd": lambda params=params, fn=grad: fn(params, xp, yp),
             "fwd_bwd_loop": lambda params=params, fn=fwd_bwd_loop: fn(params, xp, yp)}
    counts = {"fwd_bwd": poisons, "fwd_bwd_loop": poisons * steps}
    for restarts in (1, RESTARTS):
      craft = jax.jit(lambda key, params, xp, yp, xt, ya, restarts=restarts, loss_fn=loss_fn:
                      crafting.gradient_matching(key, loss_fn, params, xp, yp, xt, ya, eps=EPS,
                                                 num_steps=steps, restarts=restarts).deltas)
      label = f"crafting_r{restarts}"
      calls[label] = (lambda craft=craft, params=params:
                      craft(jax.random.key(1), params, xp, yp, xt, ya))
      counts[label] = poisons * steps * restarts
    seconds, first = common.interleaved_seconds(calls, repeats)
    rates = {k: counts[k] / max(s, 1e-12) for k, s in seconds.items()}
    results[name] = {
        "num_params": int(sum(math.prod(v.shape) for v in jax.tree.leaves(params))),
        "seconds_per_call": seconds, "first_call_seconds": first,
        "poison_steps_per_s": rates,
        "ratio_to_fwd_bwd": {k: v / rates["fwd_bwd"] for k, v in rates.items()
                             if k != "fwd_bwd"},
        "ratio_to_fwd_bwd_loop": {k: v / rates["fwd_bwd_loop"] for k, v in rates.items()
                                  if k.startswith("crafting")}}
    r = results[name]
    print(f"{name}: fwd+bwd {rates['fwd_bwd']:.0f} examples/s ({rates['fwd_bwd_loop']:.0f} "
          "in a fori_loop); "
          + ", ".join(f"{k} {rates[k]:.0f} poison-steps/s ({r['ratio_to_fwd_bwd'][k]:.3f}x)"
                      for k in rates if k.startswith("crafting")), flush=True)
  return results


# ----------------------------------------------------------------------------
# Success rate.


def run_success(eps_list: Sequence[float], num_train: int, budget: float, num_targets: int,
                num_victims: int, train_steps: int, num_steps: int,
                restarts: int) -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from jax import lax  # pylint: disable=import-outside-toplevel

  from certjax import data as data_lib  # pylint: disable=import-outside-toplevel
  from certjax.poisoning import crafting  # pylint: disable=import-outside-toplevel

  def pool(images):
    n, h, w, c = images.shape
    return images.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))

  x, y = data_lib.load_arrays({"name": "mnist5k"}, "train", 0, num_train)
  xt, yt = data_lib.load_arrays({"name": "mnist5k"}, "test", 0, 200)
  x, xt = jnp.asarray(pool(x)), jnp.asarray(pool(xt))
  y, yt = jnp.asarray(y), np.asarray(yt)
  module = _model("mlp")
  loss_fn = _loss_fn(module)
  apply = jax.jit(lambda params, images: module.apply({"params": params}, images))

  @jax.jit
  def train(key, images, labels):
    params = module.init(key, images[:1])["params"]
    opt = optax.adam(1e-2)

    def body(_, state):
      params, opt_state = state
      updates, opt_state = opt.update(jax.grad(loss_fn)(params, images, labels), opt_state,
                                      params)
      return optax.apply_updates(params, updates), opt_state

    return lax.fori_loop(0, train_steps, body, (params, opt.init(params)))[0]

  start = time.perf_counter()
  surrogate = train(jax.random.key(0), x, y)
  surrogate_pred = np.asarray(apply(surrogate, xt).argmax(-1))
  victim_seeds = list(range(1, num_victims + 1))
  # The control: each victim init trained on the clean set.
  clean_pred = {s: np.asarray(apply(train(jax.random.key(s), x, y), xt).argmax(-1))
                for s in victim_seeds}
  num_poisons = max(1, round(budget * num_train))
  rng = np.random.default_rng(0)
  targets = [int(i) for i in np.flatnonzero(surrogate_pred == yt)[:num_targets]]
  adversarial = [int(rng.choice([c for c in range(10) if c != yt[i]])) for i in targets]
  runs = {}
  for eps in eps_list:
    rows = []
    for target, adv in zip(targets, adversarial):
      idx = np.flatnonzero(np.asarray(y) == adv)[:num_poisons]
      t0 = time.perf_counter()
      result = crafting.gradient_matching(
          jax.random.key(target), loss_fn, surrogate, x[idx], y[idx], xt[target:target + 1],
          jnp.asarray([adv], jnp.int32), eps=eps, num_steps=num_steps, restarts=restarts)
      jax.block_until_ready(result)
      craft_s = time.perf_counter() - t0
      before = float(crafting.gradient_alignment_loss(
          loss_fn, surrogate, x[idx], y[idx], xt[target:target + 1],
          jnp.asarray([adv], jnp.int32)))
      poisoned = x.at[idx].add(result.deltas)
      preds = [int(apply(train(jax.random.key(s), poisoned, y), xt[target:target + 1]).argmax())
               for s in victim_seeds]
      rows.append({"target_index": target, "true_label": int(yt[target]),
                   "adversarial_label": adv, "victim_predictions": preds,
                   "successes": sum(p == adv for p in preds),
                   "clean_victim_predictions": [int(clean_pred[s][target])
                                                for s in victim_seeds],
                   "alignment_loss_before": before,
                   "alignment_loss_after": float(result.alignment_loss),
                   "crafting_seconds": craft_s})
      print(f"eps {eps:.4f} target {target} ({int(yt[target])} -> {adv}): alignment "
            f"{before:.3f} -> {float(result.alignment_loss):.3f}, victims say {preds}",
            flush=True)
    wins = sum(r["successes"] for r in rows)
    trials = len(rows) * len(victim_seeds)
    any_win = sum(r["successes"] > 0 for r in rows)
    runs[f"{eps:.6g}"] = {"eps": eps, "successes": wins, "trials": trials,
                          "success_rate": wins / max(trials, 1),
                          "targets_flipped_in_some_victim": any_win, "targets": len(rows),
                          "per_target": rows}
    print(f"eps {eps:.4f}: {wins}/{trials} (target, victim) pairs flipped; {any_win}/"
          f"{len(rows)} targets in at least one victim", flush=True)
  return {"setting": {"data": f"mnist5k train[:{num_train}], average-pooled to 14x14",
                      "model": "mlp 196-256-10 (certjax.models.get_model('mlp', "
                               "hidden=(256,)))",
                      "recipe": f"full-batch Adam lr 1e-2, {train_steps} steps; surrogate "
                                f"seed 0, victims seeds {victim_seeds} (each retrained from "
                                "scratch per target)",
                      "budget": budget, "num_poisons": num_poisons,
                      "poisons": "the first training images of the adversarial class",
                      "targets": "the first test digits the surrogate classifies "
                                 "correctly; adversarial class uniform over the other 9 "
                                 "(numpy seed 0)",
                      "crafting": {"num_steps": num_steps, "restarts": restarts,
                                   "learning_rate": 0.1, "signed_adam": True,
                                   "schedule": "x0.1 at 3/8, 5/8, 7/8"}},
          "surrogate_test_accuracy": float(np.mean(surrogate_pred == yt)),
          "clean_victim_test_accuracy": {s: float(np.mean(p == yt))
                                         for s, p in clean_pred.items()},
          "clean_victim_flips": sum(int(clean_pred[s][t] == a) for s in victim_seeds
                                    for t, a in zip(targets, adversarial)),
          "runs": runs, "seconds": time.perf_counter() - start}


def _floats(text: str) -> list[float]:
  return [float(v) for v in text.split(",") if v]


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--poisons", type=int, default=32)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--no-throughput", dest="throughput", action="store_false")
  parser.add_argument("--success", action="store_true",
                      help="measure Witches' Brew success on pooled digits (minutes)")
  parser.add_argument("--eps", type=_floats, default=[EPS],
                      help="comma-separated L-inf radii for --success")
  parser.add_argument("--train", type=int, default=2000)
  parser.add_argument("--budget", type=float, default=0.01)
  parser.add_argument("--targets", type=int, default=10)
  parser.add_argument("--victims", type=int, default=1,
                      help="victim inits retrained per target (seeds 1, 2, ...)")
  parser.add_argument("--train-steps", type=int, default=300)
  parser.add_argument("--craft-steps", type=int, default=250)
  parser.add_argument("--restarts", type=int, default=RESTARTS)
  parser.add_argument("--smoke", action="store_true",
                      help="a tiny run (8 poisons, 2 steps, 2 repeats) that writes nothing")
  parser.add_argument("--out", default="results/poison_crafting.json")
  args = parser.parse_args(argv)
  if args.smoke:
    args.poisons, args.steps, args.repeats, args.out = 8, 2, 2, ""
    args.train, args.targets, args.train_steps, args.craft_steps = 200, 1, 5, 4
  load_at_start = list(os.getloadavg())
  report: dict[str, Any] = {
      "benchmark": "Witches' Brew gradient-matching crafting vs victim forward+backward",
      "kind": "attacks", "environment": common.environment(),
      "load_average_at_start": load_at_start}
  if args.throughput:
    report.update({
        "data": "mnist5k train digits, 28x28x1", "poisons": args.poisons,
        "num_steps": args.steps, "eps": EPS, "repeats": args.repeats,
        "models": run_throughput(args.models.split(","), args.poisons, args.steps,
                                 args.repeats),
        "note": "poison_steps_per_s: poisons x steps (x restarts) per second; fwd_bwd: "
                "chained training steps on the same batch; medians of interleaved rounds"})
  if args.success:
    report["success"] = run_success(args.eps, args.train, args.budget, args.targets,
                                    args.victims, args.train_steps, args.craft_steps,
                                    args.restarts)
  report["load_average_at_end"] = list(os.getloadavg())
  print(f"load average: {load_at_start} -> {report['load_average_at_end']}")
  if args.out:
    common.write_report(args.out, report)
  return report


if __name__ == "__main__":
  main()
