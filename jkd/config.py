"""Config files and command-line overrides.

A config is a Python file with `get_config(arg=None)` returning an `ml_collections.ConfigDict`
(the big_vision / scenic convention). `--config FILE.py:ARG` passes ARG to it, and every
`--config.a.b=value` override must name an existing field and parse to that field's type; both
problems are reported as a `UserError` before anything is compiled.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import os
from typing import Any, Sequence

import ml_collections

from jkd import interrupt
from jkd.errors import UserError


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `FILE.py[:ARG]` and applies `a.b=value` overrides (without the `--config.` prefix)."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    what = 'is a directory, not a file' if os.path.isdir(path) else 'does not exist'
    raise UserError(f'Config file {path!r} {what}. Pass --config with the path of a Python '
                    'file that defines get_config(), e.g. configs/fashion_mnist/supervised.py.')
  module_spec = importlib.util.spec_from_file_location(
      f'jkd_config_{abs(hash(os.path.abspath(path)))}', path)
  if module_spec is None or module_spec.loader is None:
    raise UserError(f'Config file {path!r} is not a Python file: a config is a FILE.py that '
                    'defines get_config() returning an ml_collections.ConfigDict.')
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except interrupt.Interrupted:  # SIGTERM while loading: not the file's fault.
    raise
  except (Exception, SystemExit) as e:  # A user's file: show what broke without our traceback.
    raise UserError(f'Config file {path!r} failed to load: {_describe(e)}. Fix the file and run '
                    'the command again.') from e
  get_config = getattr(module, 'get_config', None)
  if not callable(get_config):
    raise UserError(f'Config file {path!r} has no get_config() function; define one that returns '
                    'an ml_collections.ConfigDict.')
  try:
    takes_arg = len(inspect.signature(get_config).parameters) > 0
  except (TypeError, ValueError):
    takes_arg = True
  if arg and not takes_arg:
    raise UserError(f'Config file {path!r}: get_config() takes no argument but {arg!r} was given '
                    'after the colon. Drop the ":..." part.')
  try:
    config = get_config(arg or None) if takes_arg else get_config()
  except interrupt.Interrupted:
    raise
  except (Exception, SystemExit) as e:
    given = f' with argument {arg!r}' if arg else ''
    raise UserError(f'Config file {path!r} failed to load{given}: get_config() raised '
                    f'{_describe(e)}. Fix the file, or pass an argument it accepts after the '
                    'colon.') from e
  if not isinstance(config, (ml_collections.ConfigDict, dict)):
    raise UserError(f'Config file {path!r}: get_config() returned {_short(config)} '
                    f'({type(config).__name__}), not a config. Make it return an '
                    'ml_collections.ConfigDict (or a dict), e.g. one built from '
                    'jkd.defaults.base_config().')
  try:
    config = ml_collections.ConfigDict(config)  # Also accepts a plain dict.
  except Exception as e:  # pylint: disable=broad-except  (a user's dict of anything)
    raise UserError(f'Config file {path!r}: get_config() returned a dict that is not a valid '
                    f'config ({_describe(e)}).') from e
  for override in overrides:
    apply_override(config, override)
  return config


def _describe(e: BaseException) -> str:
  text = str(e).strip()
  return f'{type(e).__name__}: {text[:300]}' if text else type(e).__name__


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + '...'


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
  """Sets one `a.b.c=value` in place, type-checked against the existing field."""
  key, sep, text = override.partition('=')
  if not sep:
    raise UserError(f'Override {override!r} has no "=". Write --config.{key}=VALUE.')
  *parents, leaf = key.split('.')
  node = config
  walked = []
  for name in parents:
    node = _child(node, name, walked)
    walked.append(name)
    if not isinstance(node, ml_collections.ConfigDict):
      raise UserError(f'--config.{key}: {".".join(walked)!r} is a value, not a group of settings.')
  if leaf not in node and walked and walked[-1] == 'model' and 'name' in node:
    current = _model_field(node['name'], leaf, node, walked)
  else:
    current = _child(node, leaf, walked)
  value = parse_value(text, current, key)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise UserError(f'--config.{key}={text}: {e}. The field currently holds '
                    f'{current!r} ({type(current).__name__}).') from e


def _model_field(model_name: str, leaf: str, node, walked: list[str]):
  """A field of the named model that the config file did not list (e.g. `model.drop_path`):
  any field `jkd.models.create` accepts may be overridden; typed by the model's default."""
  from jkd import models  # pylint: disable=g-import-not-at-top  (flax only when needed)
  try:
    default = models.field_default(model_name, leaf)
  except (KeyError, UserError):
    return _child(node, leaf, walked)  # the usual unknown-key error, with the close matches
  if default is not None and not isinstance(default, (bool, int, float, str, tuple, list)):
    return str(default)  # e.g. a dtype: the config spells it as a string ('bfloat16')
  return default


def _child(node: ml_collections.ConfigDict, name: str, walked: list[str]) -> Any:
  if name in node:
    return node[name]
  where = '.'.join(walked) or 'the config'
  close = difflib.get_close_matches(name, list(node.keys()), n=3)
  hint = f' Did you mean {", ".join(close)}?' if close else ''
  raise UserError(f'Unknown config key {".".join(walked + [name])!r}: {where} has no field '
                  f'{name!r}.{hint} Known fields there: {", ".join(sorted(node.keys()))}.')


def parse_value(text: str, current: Any, key: str) -> Any:
  """Parses `text` into the type of `current` (bool, int, float, str, tuple, list, None)."""
  def fail(expected: str):
    raise UserError(f'--config.{key}={text!r} is not a valid {expected} (the field holds '
                    f'{current!r}). Pass a value of that type.')

  if isinstance(current, bool):
    lowered = text.lower()
    if lowered in ('true', '1', 'yes'):
      return True
    if lowered in ('false', '0', 'no'):
      return False
    fail('bool (true/false)')
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      fail('integer')
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      fail('number')
  if isinstance(current, str):
    return text
  try:
    value = _literal(text)
  except (ValueError, SyntaxError):
    if current is None:
      return text  # A None default takes any string (e.g. an optional path).
    fail(type(current).__name__)
  if isinstance(current, (tuple, list)):
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return type(current)(value)
  if isinstance(current, ml_collections.ConfigDict):
    if not isinstance(value, dict):
      fail('dict')
    return ml_collections.ConfigDict(value)
  return value


def _literal(text: str) -> Any:
  """`ast.literal_eval`, plus the `dict(a=1, b='x')` spelling users write for dict fields."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    node = ast.parse(text.strip(), mode='eval').body
    return _dict_call(node)


def _dict_call(node: ast.AST) -> Any:
  """A literal, or a `dict(a=..., b=...)` call whose values are literals or such calls (so the
  spelling nests: `dict(cache=dict(dir='x'))`); anything else is a ValueError."""
  if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'dict'
      and not node.args and all(k.arg for k in node.keywords)):
    return {k.arg: _dict_call(k.value) for k in node.keywords}
  return ast.literal_eval(node)


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """A JSON-serializable copy (tuples become lists)."""
  return config.to_dict()
