"""Models: the two-domain progressive autoencoder (see ``autoencoder``)."""

from stagewise.models.autoencoder import DOMAINS, Autoencoder, ModelConfig, build, grow, init_model

__all__ = ["DOMAINS", "Autoencoder", "ModelConfig", "build", "grow", "init_model"]
