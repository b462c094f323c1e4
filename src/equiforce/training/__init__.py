"""equiforce.training: losses, optimisers, the loop, checkpoints and metrics."""
