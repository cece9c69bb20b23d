"""Selection and update methods, and the sparsity patterns they meet."""
