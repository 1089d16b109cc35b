"""stagewise: curation and progressive autoencoder training as versioned, resumable stages."""

__version__ = "0.1.0"
