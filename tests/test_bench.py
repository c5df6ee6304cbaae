"""`jkd bench` end to end on CPU: bench.json has every contract key with sane values."""
import json
import math
import os

import pytest

from jkd import cli

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
                                           ('kd_vit_b16_s16.py', 'vit_s16')])
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
                           'kd_vit_b16_s16.py': 'distill'}.get(config, 'supervised')
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
