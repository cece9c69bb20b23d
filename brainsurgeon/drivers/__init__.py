"""The drivers (one-shot and staged on the Fisher; layer-sequential) and their result."""
