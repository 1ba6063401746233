"""uadlab: unsupervised anomaly detection on frozen foundation-model features."""
__version__ = "0.1.0"
