"""BrainSegFounder-FL: federated three-stage training of a 3D brain-MRI foundation model."""

__version__ = "0.1.0"
