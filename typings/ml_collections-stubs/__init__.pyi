# Minimal stubs for ml_collections (which ships no type information): what this project
# uses. A ConfigDict's fields are dynamic, so attribute access is Any.
from ml_collections.config_dict import ConfigDict as ConfigDict
from ml_collections.config_dict import FieldReference as FieldReference
from ml_collections.config_dict import FrozenConfigDict as FrozenConfigDict

__all__ = ("ConfigDict", "FieldReference", "FrozenConfigDict")
__version__: str
