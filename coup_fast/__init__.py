"""coup_fast: fast, exact-gradient COUP purification (arXiv 2408.05900)."""
from . import engines, ops
from .ops import backend_info
from .purify import PurifiedClassifier, purify
from .score import EpsilonScore, score_sde_continuous

__all__ = ["purify", "PurifiedClassifier", "EpsilonScore", "score_sde_continuous", "backend_info", "clear_caches"]
__version__ = "0.1.0"


def clear_caches():
    """Free what the engines keep between calls: captured CUDA graphs, compiled step functions, the
    fused ops' backend choice.  Call it after rebinding model weights (model.half(), p.data = ...)
    or to release their memory."""
    engines.clear_caches()
    ops.clear_backend_choice()
