"""curator: influence-ranked curation of pretraining data."""
__version__ = "0.1.0"
