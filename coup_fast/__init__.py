"""coup_fast: fast, exact-gradient COUP purification (arXiv 2408.05900)."""
from .ops import backend_info
from .purify import PurifiedClassifier, purify
from .score import EpsilonScore, score_sde_continuous

__all__ = ["purify", "PurifiedClassifier", "EpsilonScore", "score_sde_continuous", "backend_info"]
__version__ = "0.1.0"
