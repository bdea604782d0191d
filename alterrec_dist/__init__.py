"""alterrec_dist: AlterRec session recommenders trained at catalog scale.

Layers (arrows point one way):
  CLI (train, prepare, synth) -> recipe -> {model, sharded/mining/loss, reader/dataset, evaluate/metrics}
The model code never imports torch.distributed; all parallelism lives in `sharded.py`.
"""
