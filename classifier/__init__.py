"""An image-classification toolkit: data, models, training, evaluation, bundles, prediction.

Importing the package registers the project's own CNNs with timm's model registry.
"""

try:
    from classifier import models  # noqa: F401  (registration side effect)
    from classifier.models import count_parameters, create_model
except ModuleNotFoundError as exc:
    # An inference-only install (onnxruntime, numpy, pillow) has no torch: classifier.onnx_runtime
    # and classifier.images still import there. Any other missing module is a real error.
    if exc.name not in ("torch", "torchvision", "timm"):
        raise

__version__ = "0.2.0"
__all__ = ["create_model", "count_parameters", "__version__"]
