"""ALPS (Meng, Behdin, Wang and Mazumder, 2024), the baseline our `admm` is measured against.

ALPS prunes one layer on the layer-wise objective by ADMM on the pattern constraint, then refits the kept weights
with a few conjugate-gradient steps. As its paper and the authors' code do:

  - H is damped by 1% of its mean diagonal, as every layer-wise method here;
  - ADMM with the support-driven penalty (methods/admm.py) starts from the magnitude projection of the weights
    scaled by their inputs' norms, with the penalty rho = 0.1, updated every 3 iterations, at least 30 of them;
  - the support is the pattern's largest entries of B, and 10 preconditioned CG steps (diag(H) as the
    preconditioner, which the unit diagonal makes the identity) refit the kept weights from there.

Where it differs from our `admm` (methods/layerwise.py): a magnitude start instead of SparseGPT's, a CG refit capped
at 10 steps instead of the exact update, and no candidates compared.
"""
from dataclasses import dataclass

from .. import validation
from .admm import AdmmOptions, support_admm
from .layerwise import LayerMethod
from .options import option

REFIT_TOLERANCE = 1e-4  # the authors' relative residual for the CG refit


@dataclass(frozen=True)
class AlpsOptions(AdmmOptions):
    refit_steps: int = option(10, "preconditioned CG steps of the refit on the support")

    def checked(self):
        return dict(super().checked(), refit_steps=validation.count("refit_steps", self.refit_steps, minimum=0))


class AlpsLayer(LayerMethod):
    """ALPS: ADMM with a support-driven penalty from the magnitude start, then a few CG steps on the support."""

    name = "alps"
    Options = AlpsOptions

    def prune(self, objective, pattern):
        pruned, projected, iterations, penalty = support_admm(objective, pattern, None, self.options)
        refitted = objective.exact_update(pruned, start=projected, tolerance=REFIT_TOLERANCE,
                                          max_iterations=self.refit_steps)
        self.last_stats = dict(admm_iterations=iterations, final_penalty=penalty,
                               error_before_refit=objective.error(projected), error=objective.error(refitted),
                               solve_iterations=objective.solve_iterations)
        return pruned, refitted
