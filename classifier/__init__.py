"""An image-classification toolkit: data, models, training, evaluation, bundles, prediction.

Importing the package registers the project's own CNNs with timm's model registry.
"""

from classifier import models  # noqa: F401  (registration side effect)
from classifier.models import count_parameters, create_model

__version__ = "0.2.0"
__all__ = ["create_model", "count_parameters", "__version__"]
