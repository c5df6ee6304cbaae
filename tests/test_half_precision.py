"""bfloat16 runs on a CPU (jkd.xla_cpu): finite evaluations and a word about the speed.

XLA's CPU YNNPACK element-wise / reduction fusions turned a bf16 ResNet's jitted eval logits
into NaN (eval `loss nan` after a good training run; accuracy at chance). Fresh processes: the
workaround is an XLA flag read when the backend starts.
"""
import json
import math
import os

from conftest import REPO, read_jsonl, run_jkd

SUP = os.path.join(REPO, 'configs', 'fashion_mnist', 'supervised.py') + ':tiny'


def test_bf16_run_on_cpu_evaluates_finite_and_warns(tmp_path):
  workdir = str(tmp_path / 'bf16')
  trained = run_jkd('train', '--config', SUP, '--workdir', workdir,
                    '--config.model.dtype=bfloat16')
  assert trained.returncode == 0, trained.stderr
  assert 'bfloat16/float16 on a CPU' in trained.stderr
  evals = [r for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl')) if 'split' in r]
  assert evals and all(math.isfinite(r['loss']) for r in evals), evals
  assert evals[-1]['accuracy'] > 0.15  # chance is 0.10; NaN logits scored 0.098
  evaluated = run_jkd('eval', '--workdir', workdir)
  assert evaluated.returncode == 0, evaluated.stderr
  with open(os.path.join(workdir, 'eval.json')) as f:
    result = json.load(f)
  assert math.isfinite(result['loss']) and result['accuracy'] == evals[-1]['accuracy']


def test_float32_run_leaves_xla_flags_alone():
  from jkd import xla_cpu
  assert not xla_cpu.half_precision({'model': {'dtype': 'float32'}, 'teacher': {}})
  assert xla_cpu.half_precision({'model': {'dtype': 'float32'}, 'teacher': {'dtype': 'bfloat16'}})
  before = os.environ.get('XLA_FLAGS')
  xla_cpu.prepare({'model': {'dtype': 'float32'}})
  assert os.environ.get('XLA_FLAGS') == before
