"""`jkd bench` end to end on CPU: bench.json has every contract key with sane values."""
import json
import math
import os

import jax
import pytest

from jkd import bench, cli, trainers
from jkd.config import load_config

from conftest import REPO

CONTRACT_KEYS = ('examples_per_sec', 'step_ms', 'mfu', 'peak_flops', 'flops_per_example',
                 'peak_memory_bytes', 'device')
EXTRA_KEYS = ('peak_source', 'flops_source', 'memory_source', 'jax_version', 'batch_size',
              'model', 'dtype', 'num_devices', 'step_ms_all', 'input')


# `:tiny` is the `:cpu` variant with fewer blocks, so compilation stays in seconds.
@pytest.mark.parametrize('config, model', [('vit_s16.py', 'vit_s16'),
                                           ('resnet50.py', 'resnet50'),
                                           ('mae_vit_b16.py', 'vit_b16'),
                                           ('simmim_vit_b16.py', 'vit_b16'),
                                           ('kd_vit_b16_s16.py', 'vit_s16'),
                                           ('qat_vit_s16.py', 'vit_s16')])
def test_bench_writes_contract_keys(tmp_path, capsys, config, model):
  w = str(tmp_path / 'w')
  spec = os.path.join(REPO, 'configs', 'bench', config) + ':tiny'
  assert cli.main(['bench', '--config', spec, '--workdir', w, '--config.bench.repeats=2']) == 0
  assert 'examples/s' in capsys.readouterr().out  # the printed table
  result = json.load(open(os.path.join(w, 'bench.json')))
  for key in CONTRACT_KEYS + EXTRA_KEYS:
    assert key in result, key
  assert result['model'] == model and result['batch_size'] == 8
  assert result['job'] == {'mae_vit_b16.py': 'mae', 'simmim_vit_b16.py': 'simmim',
                           'kd_vit_b16_s16.py': 'distill',
                           'qat_vit_s16.py': 'compress'}.get(config, 'supervised')
  assert result['dtype'] == 'float32' and result['device'] and result['num_devices'] >= 1
  assert result['examples_per_sec'] > 0 and result['step_ms'] > 0
  assert len(result['step_ms_all']) == 2
  assert math.isclose(result['examples_per_sec'], 8 / result['step_ms'] * 1e3, rel_tol=1e-3)
  assert result['flops_per_example'] > 1e6 and result['peak_flops'] > 0
  # A loose band: CPU timings on a shared machine are noisy, but MFU far above 1 means a
  # FLOP-count or peak error.
  assert 0 < result['mfu'] < 3
  assert result['peak_memory_bytes'] > 0
  assert 'host input pipeline not measured' in result['input']
  assert math.isfinite(result['final_loss'])
  if result['job'] == 'compress':
    assert result['quant']['enabled'] and result['quant']['weight_bits'] == 8


def test_distill_bench_without_teacher_is_user_error(tmp_path, capsys):
  spec = os.path.join(REPO, 'configs', 'bench', 'kd_vit_b16_s16.py') + ':tiny'
  code = cli.main(['bench', '--config', spec, '--workdir', str(tmp_path),
                   '--config.teacher.model='])
  assert code == 2 and 'teacher' in capsys.readouterr().err


def test_bench_rejects_unknown_job(tmp_path, capsys):
  spec = os.path.join(REPO, 'configs', 'bench', 'vit_s16.py') + ':tiny'
  code = cli.main(['bench', '--config', spec, '--workdir', str(tmp_path),
                   '--config.bench.job=nope'])
  assert code == 2 and 'config.bench.job' in capsys.readouterr().err


def _int8_matmuls(jaxpr) -> list[tuple[tuple[int, ...], ...]]:
  """Operand shapes of the dot_general/conv equations of `jaxpr` (nested ones too) whose
  operands are all int8."""
  found = []
  for eqn in jaxpr.eqns:
    if (eqn.primitive.name in ('dot_general', 'conv_general_dilated')
        and all(v.aval.dtype == 'int8' for v in eqn.invars)):
      found.append(tuple(tuple(v.aval.shape) for v in eqn.invars))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        sub = getattr(sub, 'jaxpr', sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, 'eqns'):
          found += _int8_matmuls(sub)
  return found


@pytest.mark.parametrize('quantized', [True, False])
def test_qat_bench_step_multiplies_in_int8(tmp_path, quantized):
  """The step `jkd bench` times for qat_vit_s16 (the job's own build_task) multiplies every
  kernel in int8 with int8 activations; with quantization off it has no int8 product, so a QAT
  that silently fell back to float fails here."""
  config = load_config(os.path.join(REPO, 'configs', 'bench', 'qat_vit_s16.py') + ':tiny',
                       [f'quant.enabled={quantized}'])
  command, _ = bench.JOBS[config.bench.job]
  task = trainers.get(command, config).build_task(config, str(tmp_path))
  state = jax.eval_shape(task.init_state, jax.random.key(0))
  batch = next(task.train_iterator)
  jaxpr = jax.make_jaxpr(task.train_step)(state, batch, jax.random.key(1)).jaxpr
  products = _int8_matmuls(jaxpr)
  if not quantized:
    assert not products
    return
  kernels = [leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
             if 'kernel' in jax.tree_util.keystr(path)]
  # Patch embedding; per block q, k, v, attention output, fc1, fc2; head.
  assert len(kernels) == 1 + 6 * config.model.depth + 1
  in_int8 = {shape for operands in products for shape in operands}
  assert all(tuple(k) in in_int8 for k in kernels), (kernels, products)
  # One forward product per kernel (XLA attention, the CPU variant, adds two per block).
  assert len(products) >= len(kernels)


def test_compress_still_needs_init_from(tmp_path, capsys):
  """Only the bench builds the compress step from random weights: `jkd compress` without
  --config.init_from stops with its one-paragraph error."""
  spec = os.path.join(REPO, 'configs', 'fashion_mnist', 'compress.py') + ':tiny'
  assert cli.main(['compress', '--config', spec, '--workdir', str(tmp_path)]) == 2
  assert 'init_from' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_compress_bench_needs_quant_groups(tmp_path, capsys):
  spec = os.path.join(REPO, 'configs', 'bench', 'vit_s16.py') + ':tiny'
  code = cli.main(['bench', '--config', spec, '--workdir', str(tmp_path),
                   '--config.bench.job=compress'])
  assert code == 2 and 'config.quant' in capsys.readouterr().err
