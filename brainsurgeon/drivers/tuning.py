"""The staged runs' constants, in one place: each a field of `Tuning` with its rule. They were measured on more than
one model; docs/decisions.md has the measurements and the bench JSON behind each. A run takes them as
`prune(..., tuning=Tuning(...))` or as keywords, like the other settings groups (drivers/settings.py)."""
from dataclasses import dataclass

from .. import validation
from ..methods.options import MethodOptions, option
from .reconstruct import DEFAULT_STEP, WINDOWS


@dataclass(frozen=True)
class Tuning(MethodOptions):
    """How staged runs ('max', schedule='adaptive', refine='auto') size and judge their stages."""

    step_loss_ratio: float = option(1.5, "an adaptive step goes as far as magnitude pruning keeps the judged loss "
                                         "within this ratio of the current loss")
    max_walk_stages: int = option(16, "an adaptive step covers at least 1/this of the log-density left to the "
                                      "target (CHITA++ ran 16 stages)")
    step_bisections: int = option(6, "bisections in log-density that size one adaptive step")
    refine_limit: int = option(12, "refine='auto' with held-out samples: at most this many refinement stages")
    refine_without_held_out: int = option(2, "refine='auto' without held-out samples (no judge): this many stages")
    pool_stages: int = option(24, "fresh samples are collected for at most this many stages; later ones reuse "
                                  "random subsets of them")
    path_margin: float = option(2.0, "'max' keeps the layer path only when its judged loss is lower by more than "
                                     "this many standard errors of the per-sample difference")
    layer_start_batch: int = option(32, "calibration inputs per forward pass of the layer start (and per step of "
                                        "its reconstruction)")
    layer_reconstruct: str = option("block", "the layer start fits each of the model's repeated blocks (a ResNet's "
                                             "residual blocks) to the dense one's output: block, sublayer or none")
    layer_reconstruct_epochs: int = option(20, "at most this many passes of the layer start's reconstruction")
    layer_reconstruct_step: float = option(DEFAULT_STEP, "Adam's step of the layer start's reconstruction, a "
                                                         "fraction of each layer's weight RMS")

    def checked(self):
        return dict(step_loss_ratio=validation.number("step_loss_ratio", self.step_loss_ratio, low=1, low_open=True),
                    max_walk_stages=validation.count("max_walk_stages", self.max_walk_stages),
                    step_bisections=validation.count("step_bisections", self.step_bisections, minimum=0),
                    refine_limit=validation.count("refine_limit", self.refine_limit, minimum=0,
                                                  maximum=validation.MAX_REFINE),
                    refine_without_held_out=validation.count("refine_without_held_out",
                                                             self.refine_without_held_out, minimum=0,
                                                             maximum=validation.MAX_REFINE),
                    pool_stages=validation.count("pool_stages", self.pool_stages),
                    path_margin=validation.non_negative("path_margin", self.path_margin),
                    layer_start_batch=validation.count("layer_start_batch", self.layer_start_batch),
                    layer_reconstruct=validation.choice("layer_reconstruct", self.layer_reconstruct, WINDOWS),
                    layer_reconstruct_epochs=validation.count("layer_reconstruct_epochs",
                                                              self.layer_reconstruct_epochs),
                    layer_reconstruct_step=validation.positive("layer_reconstruct_step", self.layer_reconstruct_step))


DEFAULT_TUNING = Tuning()
