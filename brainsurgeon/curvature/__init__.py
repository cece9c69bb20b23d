"""Curvature: the empirical Fisher from per-sample gradients, and the layer-wise Hessian."""
