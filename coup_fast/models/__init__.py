"""Networks and checkpoint loaders.

- :mod:`.ncsnpp`: Score SDE NCSN++ / DDPM++ cont. (CIFAR-10 score model), ``load_ncsnpp``.
- :mod:`.ddpm`: Ho et al.'s DDPM U-Net (CIFAR-10 eps model on the index 0..999), ``load_ddpm``.
- :mod:`.wideresnet`: CIFAR WideResNets in the RobustBench, DiffPure and DeepMind layouts,
  ``load_wideresnet``.
- :mod:`.digits`: the embedded 8x8-digits score model and classifier, ``load_digits_models``.

Score models take x in [-1, 1] and t in [0, 1] (the DDPM U-Net: its index t in 0..999);
classifiers take images in [0, 1].  Every loader reads files without executing them.
"""
from .ddpm import DDPMConfig, DDPMUNet, ddpm_cifar10, ddpm_small, load_ddpm
from .digits import DigitsClassifier, DigitsEpsNet, load_digits_models
from .ncsnpp import NCSNpp, NCSNppConfig, load_ncsnpp, ncsnpp_cifar10_deep, ncsnpp_small
from .wideresnet import DiffPureWideResNet, DMWideResNet, WideResNet, load_wideresnet

__all__ = ["DDPMConfig", "DDPMUNet", "ddpm_cifar10", "ddpm_small", "load_ddpm",
           "DigitsClassifier", "DigitsEpsNet", "load_digits_models",
           "NCSNpp", "NCSNppConfig", "load_ncsnpp", "ncsnpp_cifar10_deep", "ncsnpp_small",
           "DiffPureWideResNet", "DMWideResNet", "WideResNet", "load_wideresnet"]
