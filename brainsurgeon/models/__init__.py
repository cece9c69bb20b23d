"""Models and loaders: the benchmark networks, Hugging Face models, files read safely."""
