"""Facts about the places a run can train that the recipe and the planner both read; importing this
costs nothing, so `cloudtune gpus` can price without loading the recipe's models."""

# Clouds of machines the user already has, which have no price catalog and run no image: the training
# uses the cluster's Python.
OWN_CLUSTERS = ("slurm",)
