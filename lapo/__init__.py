"""lapo: latent action pretraining from unlabelled video."""

__version__ = "0.1.0"
