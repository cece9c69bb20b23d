"""How stages and paths are judged: the loss a stage is judged by, and which of the two paths of 'max' to keep."""
import math

import torch


def judged_loss(report: dict) -> float | None:
    """What stages are judged by: the held-out loss, or without held-out samples the loss on the fitted ones."""
    return report["calibration_loss"] if report.get("held_out_loss") is None else report["held_out_loss"]


def choose_path(fisher_losses: torch.Tensor, layer_losses: torch.Tensor, fisher_at_target: bool,
                margin: float) -> tuple:
    """('fisher' or 'layer', the evidence: the mean of the paths' per-sample judged loss difference and its standard
    error). The Fisher path, where it reached the target, is kept unless the layer path's loss is lower by more
    than `margin` standard errors: both are judged on the same samples, and a difference within their noise is no
    evidence for either. A Fisher walk that stopped short of the target is never chosen."""
    difference = fisher_losses - layer_losses
    error = float(difference.std() / math.sqrt(len(difference))) if len(difference) > 1 else 0.0
    evidence = dict(fisher_minus_layer=float(difference.mean()), standard_error=error)
    better = evidence["fisher_minus_layer"] > margin * error
    return ("layer" if better or not fisher_at_target else "fisher"), evidence
