"""brainsurgeon: one-shot second-order pruning with the Combinatorial Brain Surgeon and its baselines."""
from .errors import BrainSurgeonError
from .models import load_checkpoint
from .pruning import SELECTIONS, parse_method, prune
from .result import PruneResult
from .update import UPDATES

__all__ = ["prune", "PruneResult", "BrainSurgeonError", "load_checkpoint", "parse_method", "SELECTIONS", "UPDATES"]
__version__ = "0.1.0"
