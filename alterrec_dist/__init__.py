"""alterrec_dist: AlterRec session recommenders trained at catalog scale.

The commands are the top-level modules (`python -m alterrec_dist.train`, ...); the machinery is in
folders by concern, whose imports point one way (tests/test_layering.py):

  commands -> training / serve / grid -> eval -> parallel, model, data -> common

The model code never imports torch.distributed; every collective goes through `parallel.comm.Comm`.
"""
