from collections.abc import Callable
from typing import Any, TypeVar

from absl import flags
from ml_collections.config_dict import ConfigDict

_T = TypeVar("_T")

# The flag's value is what the config file's get_config(...) returns (usually a ConfigDict).
def DEFINE_config_file(
  name: str,
  default: str | None = None,
  help_string: str = ...,
  flag_values: flags.FlagValues = ...,
  lock_config: bool = True,
  accept_new_attributes: bool = False,
  sys_argv: list[str] | None = None,
  **kwargs: Any,
) -> flags.FlagHolder[Any]: ...
def DEFINE_config_dict(
  name: str,
  config: ConfigDict,
  help_string: str = ...,
  flag_values: flags.FlagValues = ...,
  lock_config: bool = True,
  accept_new_attributes: bool = False,
  sys_argv: list[str] | None = None,
  **kwargs: Any,
) -> flags.FlagHolder[ConfigDict]: ...
def DEFINE_config_dataclass(
  name: str,
  config: _T,
  help_string: str = ...,
  flag_values: flags.FlagValues = ...,
  sys_argv: list[str] | None = None,
  parse_fn: Callable[[Any], _T] | None = None,
  **kwargs: Any,
) -> flags.FlagHolder[_T]: ...
def get_config_filename(config_flag: flags.Flag[Any]) -> str: ...
def get_override_values(config_flag: flags.Flag[Any]) -> dict[str, Any]: ...
def register_flag_parser_for_type(field_type: _T, parser: flags.ArgumentParser) -> _T: ...
def register_flag_parser(*, parser: flags.ArgumentParser) -> Callable[[_T], _T]: ...
