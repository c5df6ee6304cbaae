"""The shape of the code (docs/architecture.md): no import cycle inside jkd/, only the jobs and
the command-line tools import the jobs (`jkd.trainers`), no test doubles in production code,
short trainers and functions, one trainer registry, one frozen-teacher object."""
import ast
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jkd import cli, parallel, trainers
from jkd.config import load_config
from jkd.errors import UserError
from jkd.teacher import Teacher
from jkd.trainers import compress

from conftest import REPO, SUPERVISED

JKD = os.path.join(REPO, 'jkd')
MAX_BUILD_TASK_LINES = 60
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, str]:
  """Dotted module name -> file, for every module of the jkd package."""
  out = {}
  for root, _, files in os.walk(JKD):
    for f in files:
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].split(os.sep)
        out['.'.join(rel[:-1] if rel[-1] == '__init__' else rel)] = os.path.join(root, f)
  return out


def _imports(path: str, modules: dict[str, str]) -> set[str]:
  """The jkd modules a file imports anywhere (top level or inside functions)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name in modules)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for a in node.names:  # `from jkd import data` imports the module jkd.data.
        sub = f'{node.module}.{a.name}'
        found.add(sub if sub in modules else node.module)
  return {m for m in found if m.startswith('jkd')}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  cycles, state = [], {}

  def visit(node, stack):
    state[node] = 'open'
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 'open':
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = 'done'
  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  return cycles


def test_no_import_cycle_inside_jkd():
  modules = _modules()
  graph = {m: _imports(f, modules) - {m} for m, f in modules.items()}
  assert _cycles(graph) == []
  # The detector finds a cycle where there is one (so the check above can fail).
  assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == [['a', 'b', 'c', 'a']]


# The modules above the jobs, which may import `jkd.trainers`: the trainers themselves, the CLI,
# and the command-line tools that build a job's Task (`jkd bench`, `jkd eval`, `jkd plan`,
# `jkd pipeline`). Everything else is below the jobs (docs/architecture.md).
ABOVE_THE_JOBS = ('jkd.cli', 'jkd.bench', 'jkd.evaluate', 'jkd.memory', 'jkd.pipeline')


def _called(call: ast.Call) -> str | None:
  """The name a call calls: `f` of `f(...)` and of `a.b.f(...)`."""
  return getattr(call.func, 'attr', None) or getattr(call.func, 'id', None)


def _imports_trainers(source: str, module: str, is_package: bool = False) -> list[int]:
  """The lines of `source` (the file of `module`, an `__init__.py` if `is_package`) that import
  `jkd.trainers` or a module in it, anywhere in the file: top level or inside functions,
  absolute or relative, or as a constant name given to `importlib.import_module` /
  `__import__`."""
  package = module.split('.') + (['__init__'] if is_package else [])

  def absolute(name: str | None, level: int) -> str:
    if not level:
      return name or ''
    base = package[:len(package) - level]
    return '.'.join(base + ([name] if name else []))

  def is_trainers(name: str) -> bool:
    return name == 'jkd.trainers' or name.startswith('jkd.trainers.')

  lines = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = absolute(node.module, node.level)
      names = [base] + [f'{base}.{a.name}' for a in node.names]
    elif (isinstance(node, ast.Call) and _called(node) in ('import_module', '__import__')
          and node.args and isinstance(node.args[0], ast.Constant)):
      names = [str(node.args[0].value)]
    else:
      continue
    if any(is_trainers(n) for n in names):
      lines.append(node.lineno)
  return lines


def test_only_the_jobs_and_the_tools_import_the_trainers():
  modules = _modules()
  assert set(ABOVE_THE_JOBS) <= set(modules)  # The list names real modules.
  importers = {}
  for name, path in modules.items():
    if name == 'jkd.trainers' or name.startswith('jkd.trainers.') or name in ABOVE_THE_JOBS:
      continue
    lines = _imports_trainers(open(path).read(), name, path.endswith('__init__.py'))
    if lines:
      importers[os.path.relpath(path, REPO)] = lines
  assert importers == {}, f'below the jobs, these import jkd.trainers (file: lines): {importers}'
  # The detector finds every form of the import (so the check above can fail).
  found = lambda source, module='jkd.teacher': bool(_imports_trainers(source, module))  # noqa: E731
  assert found('from jkd.trainers import common')
  assert found('from jkd.trainers.pretrain import MimObjective')
  assert found('import jkd.trainers.common as c')
  assert found('from jkd import data, trainers')
  assert found('def build():\n  from jkd.trainers import common\n  return common')
  assert found('from .trainers import common')
  assert found('from ..trainers import pretrain', 'jkd.convert.formats')
  assert found('from .. import trainers', 'jkd.deploy.classifier')
  assert not _imports_trainers('from . import trainers', 'jkd.convert', is_package=True)
  assert found("importlib.import_module('jkd.trainers.supervised')")
  assert not found('from jkd import data, models\nfrom jkd.models import build\n'
                   "trainers = 'jkd.trainers'")


def test_no_test_doubles_in_production_code():
  for name, path in _modules().items():
    source = open(path).read()
    assert 'unittest' not in source and 'mock.patch' not in source, name


def test_every_build_task_reads_in_one_screen():
  for name, path in _modules().items():
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.FunctionDef) and node.name == 'build_task':
        length = node.end_lineno - node.lineno + 1
        assert length <= MAX_BUILD_TASK_LINES, f'{name}.build_task: {length} lines'


def _long_functions(source: str, limit: int) -> list[tuple[str, int, int]]:
  """(name, line, length) of every function of `source` longer than `limit` lines, nested
  functions and methods included (a function's length counts its nested ones)."""
  return [(node.name, node.lineno, node.end_lineno - node.lineno + 1)
          for node in ast.walk(ast.parse(source))
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.end_lineno - node.lineno + 1 > limit]


def test_no_function_in_jkd_over_80_lines():
  long = [f'{name}.{fn} (line {line}): {length} lines'
          for name, path in sorted(_modules().items())
          for fn, line, length in _long_functions(open(path).read(), MAX_FUNCTION_LINES)]
  assert long == [], long
  # The counter finds a long function where there is one, nested or a method, and counts the
  # lines from `def` to the last line of the body (so the check above can fail).
  body = ''.join(f'    x{i} = {i}\n' for i in range(80))
  source = (f'def short():\n  pass\n\n\ndef outer():\n  def inner():\n{body}  return inner\n'
            f'\n\nclass C:\n  async def method(self):\n{body}')
  assert _long_functions(source, MAX_FUNCTION_LINES) == [
      ('outer', 5, 83), ('inner', 6, 81), ('method', 91, 81)]


def test_one_registry_for_commands_checkpoint_kinds_and_methods():
  assert trainers.COMMANDS == ('train', 'pretrain', 'distill', 'compress')
  mim = ml_collections.ConfigDict({'method': 'mim'})
  mae = ml_collections.ConfigDict({'method': 'mae'})
  assert trainers.get('distill').name == 'distill'
  assert trainers.get('distill', mim).name == 'mim_distill'
  assert trainers.get('pretrain', mae).name == 'pretrain'
  assert trainers.get('train', mim).name == 'supervised'  # method selects within a command
  for t in trainers.TRAINERS:
    module = t.load()
    # One way to run a job (Trainer.train runs the loop): no trainer has its own `train`.
    assert callable(module.build_task) and not hasattr(module, 'train'), t.name
  with pytest.raises(UserError, match='not a training command'):
    trainers.get('eval')
  # The CLI's training commands are the registry's.
  sub = next(a for a in cli._parser()._actions if a.dest == 'command')
  assert set(trainers.COMMANDS) <= set(sub.choices)


def test_mesh_shape_fills_the_rest_and_checks_the_devices():
  assert parallel.mesh_shape({'data': -1, 'fsdp': 2}, 8) == {'data': 4, 'fsdp': 2, 'tensor': 1}
  assert parallel.mesh_shape(None, 3) == {'data': 3, 'fsdp': 1, 'tensor': 1}
  for sizes, n, message in (({'data': -1, 'fsdp': 3}, 8, 'do not divide'),
                            ({'data': 2}, 8, 'needs 2 devices'),
                            ({'data': -1, 'fsdp': -1}, 8, 'at most one'),
                            ({'batch': 2}, 2, 'unknown axes')):
    with pytest.raises(UserError, match=message):
      parallel.mesh_shape(sizes, n)


@pytest.fixture(scope='module')
def bf16_teacher(tmp_path_factory):
  """A tiny trained classifier whose saved model computes in bfloat16."""
  w = str(tmp_path_factory.mktemp('teacher'))
  trainers.train('train', load_config(SUPERVISED + ':tiny', ['total_steps=2', 'model.dtype=bfloat16']),
                   w)
  return w


def test_teacher_from_a_workdir_places_frozen_weights_in_their_compute_dtype(bf16_teacher):
  config = load_config(SUPERVISED + ':tiny')
  teacher = Teacher.from_workdir(bf16_teacher, 10, (28, 28, 1))
  assert teacher.description == {'workdir': bf16_teacher, 'model': 'resnet8_s'}
  assert teacher.storage_dtype == np.dtype(jnp.bfloat16) and teacher.input_dtype == jnp.float32
  mesh = parallel.make_mesh({'data': 1})
  (placed,), (shardings,) = teacher.step_args(mesh)
  assert {x.dtype for x in jax.tree.leaves(placed['params'])} == {np.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(placed['batch_stats'])} == {np.dtype(np.float32)}
  assert jax.tree.structure(placed) == jax.tree.structure(shardings)
  images = jnp.zeros((2, 28, 28, 1))
  logits, taps = teacher.apply(placed, images, capture=True)
  assert logits.shape == (2, 10) and 'stage2' in jax.tree_util.keystr(
      jax.tree_util.tree_flatten_with_path(taps)[0])
  # A fp32 compute dtype overrides the saved one: weights then stay fp32.
  fp32 = Teacher.from_workdir(bf16_teacher, 10, (28, 28, 1), dtype='float32')
  assert fp32.storage_dtype == np.float32
  # Named teachers (bench, plan) are zeros of the same shapes.
  named = Teacher.named(config, 'resnet8_s')
  assert jax.tree.structure(named.variables) == jax.tree.structure(teacher.variables)
  assert all(not np.any(x) for x in jax.tree.leaves(named.variables))


def test_teacher_errors_name_the_fix(tmp_path, bf16_teacher):
  config = load_config(SUPERVISED + ':tiny')
  config.teacher = ml_collections.ConfigDict({'workdir': ''})
  with pytest.raises(UserError, match='teacher.workdir'):
    Teacher.from_config(config, 10, (28, 28, 1))
  config.teacher.workdir = bf16_teacher
  with pytest.raises(UserError, match='not a masked-image-modeling model'):
    Teacher.mim_from_config(config, (28, 28, 1))


COMPRESS = os.path.join(REPO, 'configs', 'fashion_mnist', 'compress.py')


def _terms(arg, *overrides):
  return {t['name']: (t['kind'], t['weight'], t.get('temperature'))
          for t in compress.loss_terms(load_config(f'{COMPRESS}:{arg}', list(overrides)))}


def test_compress_loss_is_config_losses_with_the_kd_weight_shorthand():
  assert _terms('tiny') == {'ce': ('ce', 1.0, None)}
  assert _terms('tiny-qat_kd') == {'ce': ('ce', 0.1, None), 'kd': ('kd', 0.9, 4.0)}
  # The shorthand of the old config: ce 1 - w, kd w at kd_temperature (default the losses').
  assert _terms('tiny', 'kd_weight=0.75', 'kd_temperature=2.0') == {
      'ce': ('ce', 0.25, None), 'kd': ('kd', 0.75, 2.0)}
  assert _terms('tiny-qat_kd', 'kd_weight=0.5') == {'ce': ('ce', 0.5, None),
                                                    'kd': ('kd', 0.5, 4.0)}
  assert _terms('tiny-qat_kd', 'kd_weight=0.0') == {'ce': ('ce', 1.0, None)}
  # Any logit term of jkd distill; feature terms need taps that compress does not have.
  assert _terms('tiny', "losses={'dkd': {'weight': 1.0}}")['dkd'][0] == 'dkd'
  with pytest.raises(UserError, match='unknown compress kind'):
    _terms('tiny', "losses={'fitnet': {'weight': 1.0}}")


def test_compress_kd_without_a_teacher_is_a_clear_error(tmp_path, capsys):
  code = cli.main(['compress', '--config', f'{COMPRESS}:tiny-qat_kd', '--workdir',
                   str(tmp_path / 'q'), f'--config.init_from={tmp_path}'])
  assert code == 2 and 'teacher.workdir' in capsys.readouterr().err
