"""Every error a user can cause, in one place.

Each is a mistake in data, arguments, weights, files or the network, worded for the person who made
it: the command lines print it as one `error:` line with no traceback, the app as one message. Any
other exception is a bug, and its traceback is worth seeing. Each type also keeps the built-in base
it always had (ValueError, RuntimeError, ...), so code that catches those still does.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix, described so that they can: what, where, and what to do."""


class DataError(UserError, ValueError):
    """A problem with the user's data (a missing folder, an empty class, a bad CSV)."""


class ModelError(UserError, ValueError):
    """A model that cannot be built as asked."""


class BundleError(UserError, ValueError):
    """A bundle that is missing, incomplete or inconsistent."""


class ImageError(UserError, ValueError):
    """An image that cannot be used (not an image, damaged, too large)."""


class TrainingDiverged(UserError, FloatingPointError):
    """The loss became NaN or infinite; nothing from the broken step was saved."""


class ResumeMismatch(UserError, ValueError):
    """The checkpoint to resume was written with other settings than the run's, in a way that matters."""


class HubError(UserError, RuntimeError):
    """A Hugging Face Hub operation that failed; never contains a token."""


class LRFinderError(UserError, ValueError):
    """A learning-rate range test that cannot run or gave no usable curve."""


class SearchError(UserError, ValueError):
    """A hyperparameter search that cannot run as asked."""


class InputError(UserError, ValueError):
    """Inputs to predict that cannot be turned into a list of images."""


class ConfigError(UserError, ValueError):
    """A configuration (a --config file, a recipe) that names unknown settings or bad values."""


class StorageError(UserError, OSError):
    """A file or folder that cannot be written: a full disk, a read-only or missing folder, a file
    where a folder should be. Says which path, and what to do."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint to resume from that cannot be read: cut short, damaged, or not a checkpoint."""


class TrainingCollapsed(UserError, RuntimeError):
    """Training ended no better than chance; its model was not written over a good one."""


class StalledRank(UserError, RuntimeError):
    """A process of a distributed run stopped answering; says which rank, where, and since when."""


# What the command lines catch and print as one line.
class NoFeatureMap(UserError, ValueError):
    """No heatmap of where the model looked can be made: the model has no convolutional feature map
    (a plain MLP, say), or it is served without torch (an ONNX export). Here, not in classifier.cam,
    so that the app can name it without importing torch."""


USER_ERRORS = (UserError,)
