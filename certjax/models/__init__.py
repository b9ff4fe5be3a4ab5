"""Flax (linen) models looked up by name, and the `logits_fn` they become.

    model = get_model('resnet20', num_classes=10, mean=CIFAR_MEAN, std=CIFAR_STD)
    variables = init_variables(model, jax.random.key(0), (1, 32, 32, 3))
    logits_fn = make_logits_fn(model, variables)   # images in [0, 1] -> logits

Every model normalises its input as its first layer, so perturbation sizes are
in [0, 1] pixel space; dataset statistics live in `certjax.data`.
"""

from certjax.models.base import (ImageClassifier, InputTransformed, Normalize,
                                 check_model_input)
from certjax.models.convnets import CNN7, ConvSpec, IBPConvNet
from certjax.models.mlp import MLP
from certjax.models.registry import (MODEL_NAMES, count_params, get_model,
                                     init_variables, make_logits_fn,
                                     make_stacked_logits, model_options)
from certjax.models.resnets import CifarResNet, PreActResNet, WideResNet

__all__ = [
    "InputTransformed",
    "CNN7",
    "CifarResNet",
    "ConvSpec",
    "IBPConvNet",
    "ImageClassifier",
    "MLP",
    "MODEL_NAMES",
    "Normalize",
    "PreActResNet",
    "WideResNet",
    "check_model_input",
    "count_params",
    "get_model",
    "init_variables",
    "make_logits_fn",
    "make_stacked_logits",
    "model_options",
]
