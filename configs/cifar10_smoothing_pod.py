r"""configs/cifar10_smoothing.py (Cohen et al.'s CIFAR-10 ResNet-110 with Gaussian
noise) sized for a pod: 256 devices, e.g. a TPU pod slice or 32 hosts x 8 GPUs.

What changes against the single-host config, and why:
  * batch_size 4,096 (16 images per device on 256 devices; any device count
    dividing 4,096 works: 8, 16, ..., 4,096) instead of 256;
  * learning rate 0.1 x 4,096 / 256 = 1.6 with a linear warm-up over the
    first 5 epochs (the linear scaling rule of Goyal et al. 2017, "Accurate,
    Large Minibatch SGD"), still divided by 10 after 1/3 and 2/3 of the run;
  * eval_batch_size 4,096: the 10,000 test images in 3 global batches, the
    last one padded and masked;
  * certification: certify.images_per_call = 512 (2 images per device per
    call; every host certifies its share of each group) and
    certify.batch_size = 1,000 noisy copies per device and forward pass.
BatchNorm statistics are computed over the global batch: the batch axis is
split over devices but the model sees one array, so XLA reduces the means
across devices (synchronised BatchNorm).

Commands. Every host runs the same command; the workdir and TFDS data_dir
must be on a filesystem every host sees (NFS, Filestore, a gcsfuse mount).
See launch/README.md for SLURM and explicit CERTJAX_* start-up.
  TPU pod slice (Cloud TPU VMs):
    gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd certjax && \
      CERTJAX_DISTRIBUTED=auto python -m launch.train \
      --config=configs/cifar10_smoothing_pod.py:sigma=0.25 --workdir=/shared/c10_s025_pod \
      --config.data.data_dir=/shared/tensorflow_datasets"
    (then the same with launch.certify instead of launch.train)
  GPU cluster under SLURM, one process per GPU:
    srun --nodes=32 --ntasks-per-node=8 --gpus-per-node=8 python -m launch.train \
      --config=configs/cifar10_smoothing_pod.py:sigma=0.25 --workdir=/shared/c10_s025_pod \
      --config.data.data_dir=/shared/tensorflow_datasets

Expected result: untested at this scale (no accelerators were available to
certjax's authors for it). The target is the single-host config's, Cohen et
al.'s ResNet-110 (about 75% certified accuracy at radius 0, 60% at 0.25, 43%
at 0.5 for sigma = 0.25, ACR about 0.42; see configs/cifar10_smoothing.py);
the 16x larger batch may lose some accuracy even with warm-up, so compare
against the single-host run before trusting it. Runtime: not measured;
training is 1,099 steps of 4,096 images, certification of the 500 images
(skip 20) at n = 100,000 is 50 million ResNet-110 forward passes, about
200,000 per device on 256 devices.
"""

import math

import ml_collections

from configs import cifar10_smoothing

NUM_DEVICES = 256
REFERENCE_BATCH = 256  # Cohen et al.'s batch, at learning rate 0.1
CIFAR10_TRAIN_IMAGES = 50_000


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = cifar10_smoothing.get_config(arg)
  config.batch_size = 16 * NUM_DEVICES
  config.optimizer.learning_rate = 0.1 * config.batch_size / REFERENCE_BATCH
  config.optimizer.warmup_steps = math.ceil(5 * CIFAR10_TRAIN_IMAGES / config.batch_size)
  config.eval_batch_size = 16 * NUM_DEVICES
  config.log_every_steps = 20
  config.checkpoint_every_steps = 200
  config.certify.images_per_call = 2 * NUM_DEVICES
  config.certify.batch_size = 1000
  return config
