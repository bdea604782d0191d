"""The training engine: the recipe (Algorithm 1), its schedule, the optimizer stepper, checkpoints and resume, the launchers and the run directory."""
