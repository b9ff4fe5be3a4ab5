"""Privacy attacks: what a trained model leaks about its training data.

Modules:
  `membership`: membership inference from cached logits and membership masks
    (loss/confidence thresholds, Shokri shadow models, LiRA, RMIA,
    label-only), and the metrics their papers report (ROC, AUC, TPR at low FPR).
  `inversion`: model inversion (Fredrikson et al. 2015) and gradient inversion
    of (Fed)SGD updates (DLG, iDLG, Geiping et al. 2020), with PSNR/SSIM.
  `extraction`: a query-counting victim interface, learning-based extraction
    (Knockoff Nets) and functionally equivalent extraction of ReLU networks.
  `property`: property inference (Ganju et al. 2018): meta-classifiers over
    permutation-invariant representations of shadow models' parameters, or
    over their outputs on fixed queries.

Like every algorithm package, `certjax.privacy` imports no training, data,
model, run or config code: attacks take logits, a `logits_fn` or a pytree of
parameters and a `key`. Training the shadow models they need is the
many-models trainer's job (`certjax.training.many`); running them on a
trained workdir is the 'membership' evaluator's (`certjax.evaluation`).
"""

from certjax.privacy import extraction
from certjax.privacy import inversion
from certjax.privacy import membership
from certjax.privacy import property  # pylint: disable=redefined-builtin
