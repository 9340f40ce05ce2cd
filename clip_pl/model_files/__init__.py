"""Model files: training checkpoints, exported models, OpenAI/OpenCLIP models, pretrained weights.

``load.read_model_file`` reads any clip_pl model file; ``load.load`` (``clip_pl.load``) also
OpenAI/OpenCLIP models. Nothing here trains or evaluates.
"""
