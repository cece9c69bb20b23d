"""brainsurgeon: one-shot second-order pruning with the Combinatorial Brain Surgeon and its baselines."""
from .errors import BrainSurgeonError
from .models import load_checkpoint
from . import hf
from .pruning import SELECTIONS, parse_method, prune
from .sequential import prune_layerwise
from .result import PruneResult
from .update import UPDATES

__all__ = ["prune", "prune_layerwise", "PruneResult", "BrainSurgeonError", "load_checkpoint", "parse_method", "SELECTIONS", "UPDATES"]
__version__ = "0.1.0"
