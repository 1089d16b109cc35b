"""The second model family: multi-phase latent-diffusion fine-tuning on the captioned latent cache.

``diffuse_init`` builds (or loads from an SD-layout folder) the UNet, the frozen CLIP text encoder and its
tokenizer into ``runs/init/``; each ``diffuse@<phase>`` of the ``diffusion.stages`` recipe trains the
UNet from its parent's on one ``cache@<px>`` folder (``loop.PhaseTrainer``), with the autoencoder
trainer's backups, NaN guard, EMA and exact resume.
"""
