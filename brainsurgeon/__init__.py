"""brainsurgeon: one-shot second-order pruning with the Combinatorial Brain Surgeon and its baselines."""
from .drivers.oneshot import prune
from .drivers.registry import SELECTIONS, StageOptions, parse_method
from .drivers.result import PruneResult
from .drivers.sequential import prune_layerwise
from .drivers.settings import FisherSettings, LayerSettings
from .drivers.structured import StructuredResult, prune_structured
from .drivers.tuning import Tuning
from .errors import BrainSurgeonError
from .methods.catalog import LAYER_METHODS, method_table
from .methods.update import UPDATES
from .models.resized import load_resized, save_resized
from .models.shrunk import load_pruned, save_shrunk
from .models.vision import load_checkpoint

__all__ = ["prune", "prune_layerwise", "prune_structured", "StructuredResult", "PruneResult", "FisherSettings",
           "LayerSettings", "StageOptions", "Tuning", "BrainSurgeonError", "load_checkpoint", "load_pruned",
           "save_shrunk", "load_resized", "save_resized", "parse_method", "SELECTIONS", "UPDATES", "LAYER_METHODS",
           "method_table"]
__version__ = "0.1.0"
