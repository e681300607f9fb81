"""Configuration: the YAML file read once into frozen objects (``Config``, ``Route`` ...), every error located.

The public surface is re-exported here, so callers need not know how the schema and its readers are split.
"""

from mlmirror.config.model import *  # noqa: F403 - the public surface is model's __all__
from mlmirror.config.model import MODEL_INFER
from mlmirror.config.model import __all__ as _model_all

__all__ = [*_model_all, "MODEL_INFER"]
