"""Networks and checkpoint loaders.

- :mod:`.ncsnpp`: Score SDE NCSN++ / DDPM++ cont. (CIFAR-10 score model), ``load_ncsnpp``.
- :mod:`.wideresnet`: RobustBench WideResNet-28-10 / DeepMind WRN-70-16, ``load_wideresnet``.
- :mod:`.digits`: the embedded 8x8-digits score model and classifier, ``load_digits_models``.

Score models take x in [-1, 1] and t in [0, 1]; classifiers take images in [0, 1].
"""
from .digits import DigitsClassifier, DigitsEpsNet, load_digits_models
from .ncsnpp import NCSNpp, NCSNppConfig, load_ncsnpp, ncsnpp_cifar10_deep, ncsnpp_small
from .wideresnet import DMWideResNet, WideResNet, load_wideresnet

__all__ = ["DigitsClassifier", "DigitsEpsNet", "load_digits_models",
           "NCSNpp", "NCSNppConfig", "load_ncsnpp", "ncsnpp_cifar10_deep", "ncsnpp_small",
           "DMWideResNet", "WideResNet", "load_wideresnet"]
