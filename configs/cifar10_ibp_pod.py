r"""configs/cifar10_ibp.py (IBP / CROWN-IBP certified training of Gowal et al.'s
large CNN on CIFAR-10) sized for a pod: 256 devices, e.g. a TPU pod slice or
32 hosts x 8 GPUs. `get_config('8')`, `get_config('2,crown_ibp')` etc. as there.

What changes against the single-host config, and why:
  * batch_size 4,096 (16 images per device on 256 devices; any device count
    dividing 4,096 works) instead of 512;
  * Adam learning rate 5e-4 x sqrt(4,096 / 512) = 1.41e-3 (square-root
    scaling, the usual rule for Adam; Hoffer et al. 2017) with a linear
    warm-up over the first 10 epochs (the eps = 0 phase lasts 320 epochs, so
    the warm-up ends long before the eps ramp starts);
  * the epoch budget (3,200), the eps warm-up and ramp and the decay epochs
    are unchanged: they are fractions of the run, which is now 39,063 steps;
  * eval_batch_size 4,096 and verify.batch_size 1,024 (4 images per device;
    bounds hold several intermediate intervals per image), the last batch
    padded and masked.

Commands. Every host runs the same command; the workdir and TFDS data_dir
must be on a filesystem every host sees (NFS, Filestore, a gcsfuse mount).
See launch/README.md for SLURM and explicit CERTJAX_* start-up.
  TPU pod slice (Cloud TPU VMs):
    gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd certjax && \
      CERTJAX_DISTRIBUTED=auto python -m launch.train --config=configs/cifar10_ibp_pod.py:8 \
      --workdir=/shared/c10_ibp8_pod --config.data.data_dir=/shared/tensorflow_datasets"
    (then the same with launch.verify instead of launch.train)
  GPU cluster under SLURM, one process per GPU:
    srun --nodes=32 --ntasks-per-node=8 --gpus-per-node=8 python -m launch.train \
      --config=configs/cifar10_ibp_pod.py:8 --workdir=/shared/c10_ibp8_pod \
      --config.data.data_dir=/shared/tensorflow_datasets

Expected result: untested at this scale (no accelerators were available to
certjax's authors for it). The target is the single-host config's: about
73% IBP-verified test error at eps 8/255 (Gowal et al. 2018), 67% with
CROWN-IBP (Zhang et al. 2020); a larger batch with scaled Adam usually
changes certified training little, but this has not been checked. Runtime:
not measured; 39,063 steps of 4,096 images.
"""

import math

import ml_collections

from configs import cifar10_ibp

NUM_DEVICES = 256
REFERENCE_BATCH = 512  # the single-host config's batch, at learning rate 5e-4
CIFAR10_TRAIN_IMAGES = 50_000


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = cifar10_ibp.get_config(arg)
  reference_lr = config.optimizer.learning_rate
  config.batch_size = 16 * NUM_DEVICES
  config.optimizer.learning_rate = reference_lr * math.sqrt(config.batch_size / REFERENCE_BATCH)
  config.optimizer.warmup_steps = math.ceil(10 * CIFAR10_TRAIN_IMAGES / config.batch_size)
  config.eval_batch_size = 16 * NUM_DEVICES
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.verify.batch_size = 4 * NUM_DEVICES
  return config
