"""Configuration: the YAML file read once into frozen objects (``Config``, ``Route`` ...), every error located.

The schema (``schema``, ``schema_observing``: the dataclasses, their defaults and each key's description) is apart
from the readers (``reader``, ``read_route``, ``read_observers``: YAML to dataclasses, ``file:line: key: reason``
errors). The public surface is re-exported here (each module's ``__all__``), so callers need not know how they are
split.
"""

from mlmirror.config import schema, schema_observing
from mlmirror.config.reader import load_config, parse_config
from mlmirror.config.schema import *  # noqa: F403 (re-exported: the schema's __all__)
from mlmirror.config.schema_observing import *  # noqa: F403

__all__ = [*schema.__all__, *schema_observing.__all__, "load_config", "parse_config"]
