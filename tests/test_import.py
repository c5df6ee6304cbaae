"""`jkd import` / `jkd.convert`: a public checkpoint becomes the same network in jkd.

Every source is checked against its real reference code (timm, torchvision, transformers, the
official MAE and SimMIM models, big_vision) through the fixtures of
tests/fixtures/import/make.py: the file is rebuilt in its own format from the recorded weights,
imported, and jkd's outputs (logits; MAE's and SimMIM's reconstructions and losses under the
same mask) must equal the reference's to 1e-5 of its largest value, in float32.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import convert, losses, masking, trainers
from jkd.config import load_config
from jkd.convert import formats
from jkd.errors import UserError
from jkd.teacher import Teacher

from conftest import REPO, read_jsonl, run_jkd
from import_weights import generate

FIXTURES = os.path.join(REPO, 'tests', 'fixtures', 'import')
NAMES = sorted(f[:-5] for f in os.listdir(FIXTURES) if f.endswith('.json'))
CONFIGS = os.path.join(REPO, 'configs', 'fashion_mnist')
TOLERANCE = 1e-5


def _fixture(name: str, directory) -> tuple[dict, dict, str]:
  """(spec, reference arrays, path of the checkpoint rebuilt in its own format)."""
  with open(os.path.join(FIXTURES, f'{name}.json')) as f:
    spec = json.load(f)
  arrays = dict(np.load(os.path.join(FIXTURES, f'{name}.npz')))
  if spec['format'] == 'pth':  # A real torch.save file, committed whole.
    return spec, arrays, os.path.join(FIXTURES, f'{name}.pth')
  kept = {k[len('kept/'):]: v for k, v in arrays.items() if k.startswith('kept/')}
  weights = generate(spec, kept)
  path = os.path.join(str(directory), f'{name}.{spec["format"]}')
  if spec['format'] == 'npz':
    np.savez(path, **weights)
  else:
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, path)
  return spec, arrays, path


def _mae_mask(arrays) -> masking.MaeMask:
  """The official model's random masking of the fixture, as a jkd MaeMask."""
  ids_restore = jnp.asarray(arrays['ids_restore'])
  keep = int(ids_restore.shape[1] * (1 - 0.75))
  ids_keep = jnp.argsort(ids_restore, axis=1)[:, :keep].astype(jnp.int32)
  return masking.MaeMask(ids_keep, ids_restore, jnp.asarray(arrays['mask']))


def _close(out, ref, what):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  assert out.shape == ref.shape, (what, out.shape, ref.shape)
  error = np.abs(out - ref).max() / np.abs(ref).max()
  assert error <= TOLERANCE, f'{what}: relative error {error:.2e}'


@pytest.mark.parametrize('name', NAMES)
def test_import_equals_the_reference_network(name, tmp_path):
  spec, arrays, path = _fixture(name, tmp_path)
  module, variables = convert.load(path, **spec['jkd'])
  x = jnp.asarray(arrays['inputs'])
  if 'ids_restore' in arrays:      # Official MAE: reconstructions (and loss) under its mask.
    mask = _mae_mask(arrays)
    pred = module.apply(variables, x, mask)
    if 'loss' in arrays:
      loss = losses.mae_mse(pred, masking.patchify(x, module.patch_size), mask.mask,
                            norm_pix=True)
      _close(loss, arrays['loss'], f'{name} loss')
  elif 'mask' in arrays:           # Official SimMIM: reconstructions and loss.
    mask = jnp.asarray(arrays['mask'])
    pred = module.apply(variables, x, mask)
    loss = losses.simmim_l1(pred, x, masking.upsample_mask(mask.astype(jnp.float32),
                                                           module.patch_size))
    _close(loss, arrays['loss'], f'{name} loss')
  else:
    pred = module.apply(variables, x)
  _close(pred, arrays['outputs'], name)


def test_fixtures_cover_every_source():
  sources = ' | '.join(json.load(open(os.path.join(FIXTURES, f'{n}.json')))['source']
                       for n in NAMES)
  for source in ('timm VisionTransformer', 'VisionTransformerDistilled', 'init_values',
                 'timm resnet18', 'torchvision resnet18', 'torchvision resnet34',
                 'torchvision resnet50', 'transformers ViT', 'facebookresearch/mae models_mae',
                 'facebookresearch/mae models_vit', 'microsoft/SimMIM', 'big_vision'):
    assert source in sources, source


def test_pytorch_reader_reads_a_real_torch_save_file():
  """The committed official-MAE .pth (torch.save({'model': state_dict})) reads weights-only,
  without torch, to exactly the tensors the fixture's weights are."""
  with open(os.path.join(FIXTURES, 'mae_pretrain.json')) as f:
    spec = json.load(f)
  arrays = np.load(os.path.join(FIXTURES, 'mae_pretrain.npz'))
  kept = {k[len('kept/'):]: arrays[k] for k in arrays.files if k.startswith('kept/')}
  tensors, fmt = formats.read_tensors(os.path.join(FIXTURES, 'mae_pretrain.pth'))
  assert fmt == 'pytorch'
  expected = generate(spec, kept)
  assert list(tensors) == list(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(tensors[k], v)


def test_transformers_hub_names_import_the_same(tmp_path):
  """Hub files keep transformers' pre-5 ViT names; both spellings give the same model."""
  spec, arrays, path = _fixture('hf_vit', tmp_path)
  from safetensors.numpy import load_file, save_file
  old = {}
  for k, v in load_file(path).items():
    for new, before in (('.layers.', '.encoder.layer.'),
                        ('attention.q_proj', 'attention.attention.query'),
                        ('attention.k_proj', 'attention.attention.key'),
                        ('attention.v_proj', 'attention.attention.value'),
                        ('attention.o_proj', 'attention.output.dense'),
                        ('mlp.fc1', 'intermediate.dense'), ('mlp.fc2', 'output.dense')):
      k = k.replace(new, before)
    old[k] = v
  assert 'vit.encoder.layer.0.attention.attention.query.weight' in old
  save_file(old, str(tmp_path / 'old.safetensors'))
  module, variables = convert.load(str(tmp_path / 'old.safetensors'), num_heads=3)
  _close(module.apply(variables, jnp.asarray(arrays['inputs'])), arrays['outputs'], 'old names')


def test_image_size_and_classes_can_change(tmp_path):
  """Another image size resamples the position table (as timm: the 48 px fixture is timm's own
  resampling); another class count gets a fresh head, reported."""
  _, arrays, path = _fixture('timm_vit', tmp_path)
  converted, source = convert.read(path, {'num_heads': 3})
  config = convert.default_config(converted)
  config.data.num_classes = 5
  imported = convert.build(converted, config, source=source)
  assert imported.report['fresh'] == ['head/bias (checkpoint (10,), model (5,))',
                                      'head/kernel (checkpoint (48, 10), model (48, 5))']
  assert imported.report['dropped'] == [] and imported.report['used'] == 32
  logits = imported.module.apply(imported.variables, jnp.asarray(arrays['inputs']))
  assert logits.shape == (2, 5)
  module, variables = convert.load(path, num_heads=3, image_size=48)
  pos = variables['params']['pos_embedding']
  assert pos.shape == (1, 36, 48)


def _pickle_zip(path, obj_bytes: bytes):
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', obj_bytes)
    z.writestr('archive/version', '3\n')


def test_bad_checkpoints_are_clear_errors(tmp_path):
  _, _, vit_path = _fixture('timm_vit', tmp_path)
  cases = []
  junk = tmp_path / 'junk.bin'
  junk.write_bytes(os.urandom(256))
  cases.append((str(junk), 'not a checkpoint jkd can read'))
  cases.append((str(tmp_path / 'missing.pth'), 'does not exist'))
  evil = tmp_path / 'evil.pth'  # A pickle that would run os.system: refused, never executed.
  _pickle_zip(str(evil), b"cos\nsystem\n(S'touch " + str(tmp_path / 'pwned').encode()
              + b"'\ntR.")
  cases.append((str(evil), 'weights-only load does not execute'))
  args = tmp_path / 'args.pth'
  import argparse
  _pickle_zip(str(args), pickle.dumps({'args': argparse.Namespace(lr=1)}, protocol=2))
  cases.append((str(args), 'argparse.Namespace'))
  from safetensors.numpy import save_file
  save_file({'encoder.weight': np.zeros((3, 3), np.float32)}, str(tmp_path / 'other.safetensors'))
  cases.append((str(tmp_path / 'other.safetensors'), 'encoder.weight (3, 3)'))
  for path, message in cases:
    with pytest.raises(UserError, match=message.replace('(', r'\(').replace(')', r'\)')):
      convert.load(path)
  assert not os.path.exists(tmp_path / 'pwned')
  with pytest.raises(UserError, match='num_heads'):  # width 48: the head count is not in shapes
    convert.load(vit_path)
  with pytest.raises(UserError, match='--model vit_s16 is a ViT of'):  # sizes do not fit
    convert.load(vit_path, model='vit_s16')
  with pytest.raises(UserError, match='not a ViT'):
    convert.load(vit_path, model='resnet18')


@pytest.fixture(scope='module')
def deit_workdir(tmp_path_factory):
  """The Fashion-MNIST DeiT fixture imported with `jkd import` (the real CLI)."""
  d = tmp_path_factory.mktemp('deit')
  _, _, path = _fixture('deit_fmnist', d)
  w = str(d / 'imported')
  out = run_jkd('import', '--checkpoint', path, '--workdir', w, '--config',
                f'{CONFIGS}/supervised.py:tiny', '--config.model.num_heads=3')
  assert out.returncode == 0, out.stderr
  assert '35 tensors used' in out.stdout and 'timm_vit layout' in out.stdout, out.stdout
  return w, path


def test_imported_workdir_is_a_teacher_eval_target_and_refuses_a_second_import(deit_workdir):
  w, path = deit_workdir
  report = json.load(open(os.path.join(w, 'import.json')))
  assert report['layout'] == 'timm_vit' and report['fresh'] == [] and report['dropped'] == []
  config = load_config(f'{CONFIGS}/distill.py:tiny', [f'teacher.workdir={w}'])
  teacher = Teacher.from_config(config, 10, (28, 28, 1))
  module, variables = convert.load(path, num_heads=3)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 28, 28, 1)), jnp.float32)
  np.testing.assert_allclose(teacher.apply(teacher.variables, x)[0], module.apply(variables, x),
                             rtol=1e-6, atol=1e-6)
  again = run_jkd('import', '--checkpoint', path, '--workdir', w, '--config.model.num_heads=3')
  assert again.returncode == 2 and 'already holds checkpoints' in again.stderr
  assert 'Traceback' not in again.stderr


def test_deit_end_to_end_import_eval_distill_compress(deit_workdir, tmp_path):
  w, _ = deit_workdir
  out = run_jkd('eval', '--workdir', w)
  assert out.returncode == 0, out.stderr
  assert 0 <= json.load(open(os.path.join(w, 'eval.json')))['accuracy'] <= 1
  kd = str(tmp_path / 'kd')
  out = run_jkd('distill', '--config', f'{CONFIGS}/distill.py:tiny', '--workdir', kd,
                f'--config.teacher.workdir={w}')
  assert out.returncode == 0, out.stderr
  summary = json.load(open(os.path.join(kd, 'summary.json')))
  assert summary['teacher']['workdir'] == w and 'teacher_accuracy' in summary['eval']
  q = str(tmp_path / 'q')
  out = run_jkd('compress', '--config', f'{CONFIGS}/compress.py:tiny-qat_kd', '--workdir', q,
                f'--config.init_from={kd}', f'--config.teacher.workdir={w}')
  assert out.returncode == 0, out.stderr
  summary = json.load(open(os.path.join(q, 'summary.json')))
  assert summary['compression_ratio'] > 3 and 0 <= summary['export_accuracy'] <= 1
  lines = [l for l in read_jsonl(os.path.join(q, 'metrics.jsonl')) if 'loss_kd' in l]
  assert lines and np.isfinite(lines[-1]['loss_kd'])


def test_mae_end_to_end_import_eval_mim_distill_finetune_compress(tmp_path):
  _, _, path = _fixture('mae_pretrain_fmnist', tmp_path)
  w = str(tmp_path / 'mae')
  out = run_jkd('import', '--checkpoint', path, '--workdir', w, '--config',
                f'{CONFIGS}/mae.py:tiny', '--config.model.num_heads=3')
  assert out.returncode == 0, out.stderr
  assert 'mae_pretrain layout' in out.stdout and "'sincos2d_mae'" in out.stdout, out.stdout
  out = run_jkd('eval', '--workdir', w)
  assert out.returncode == 0, out.stderr
  assert np.isfinite(json.load(open(os.path.join(w, 'eval.json')))['loss'])
  student = str(tmp_path / 'student')
  out = run_jkd('distill', '--config', f'{CONFIGS}/mim_distill.py:tiny', '--workdir', student,
                f'--config.teacher.workdir={w}')
  assert out.returncode == 0, out.stderr
  summary = json.load(open(os.path.join(student, 'summary.json')))
  assert summary['teacher']['method'] == 'mae' and np.isfinite(summary['teacher_eval_loss'])
  ft = str(tmp_path / 'ft')
  out = run_jkd('train', '--config', f'{CONFIGS}/finetune.py:tiny', '--workdir', ft,
                f'--config.init_from={student}')
  assert out.returncode == 0, out.stderr
  q = str(tmp_path / 'q')
  out = run_jkd('compress', '--config', f'{CONFIGS}/compress.py:tiny', '--workdir', q,
                f'--config.init_from={ft}', '--config.model.name=vit_nano_p4',
                '--config.model.posemb=sincos2d_mae')
  assert out.returncode == 0, out.stderr
  assert json.load(open(os.path.join(q, 'summary.json')))['compression_ratio'] > 3


def _make_legacy(workdir: str) -> None:
  """Rewrites a workdir's checkpoint metadata as jkd wrote it before the MAE table changed:
  no `model_defaults`, no posemb in the saved model config."""
  ckpt = os.path.join(workdir, 'checkpoints')
  for step in os.listdir(ckpt):
    path = os.path.join(ckpt, step, 'meta', 'metadata')
    meta = json.load(open(path))
    meta.pop('model_defaults')
    meta.pop('model_fields')
    meta['config']['model'].pop('posemb')
    json.dump(meta, open(path, 'w'))


def test_mae_runs_made_before_the_table_fix_keep_their_table(tmp_path):
  """An MAE workdir from before 2026-12 (jkd's own sin-cos table, not recorded) evaluates,
  teaches and is refused for resume or fine-tuning with the new table, never silently
  changed."""
  w = str(tmp_path / 'old_mae')
  out = run_jkd('pretrain', '--config', f'{CONFIGS}/mae.py:tiny', '--workdir', w,
                '--config.model.posemb=sincos2d')
  assert out.returncode == 0, out.stderr
  assert run_jkd('eval', '--workdir', w).returncode == 0
  before = json.load(open(os.path.join(w, 'eval.json')))['loss']
  _make_legacy(w)
  assert run_jkd('eval', '--workdir', w).returncode == 0
  assert json.load(open(os.path.join(w, 'eval.json')))['loss'] == before
  # The check can fail: the same weights under the new table give another loss.
  assert run_jkd('eval', '--workdir', w, '--config.model.posemb=sincos2d_mae').returncode == 0
  assert json.load(open(os.path.join(w, 'eval.json')))['loss'] != before
  config = load_config(f'{CONFIGS}/mim_distill.py:tiny', [f'teacher.workdir={w}'])
  assert Teacher.mim_from_config(config, (28, 28, 1)).module.posemb == 'sincos2d'
  resumed = run_jkd('pretrain', '--config', f'{CONFIGS}/mae.py:tiny', '--workdir', w,
                    '--config.total_steps=12')
  assert resumed.returncode == 2 and 'model.posemb=sincos2d' in resumed.stderr
  finetune = run_jkd('train', '--config', f'{CONFIGS}/finetune.py:tiny', '--workdir',
                     str(tmp_path / 'ft'), f'--config.init_from={w}')
  assert finetune.returncode == 2 and "'sincos2d'" in finetune.stderr
  assert 'Traceback' not in resumed.stderr + finetune.stderr


@pytest.mark.slow
def test_fixtures_are_what_the_reference_code_makes(tmp_path):
  """Regenerates every fixture from the reference code and compares with the committed ones.
  Needs a Python with torch, torchvision, timm and transformers (JKD_REFERENCE_PYTHON) and
  clones of the official repositories (JKD_MAE_REPO, JKD_SIMMIM_REPO, JKD_BIG_VISION_REPO);
  docs/pretrained.md says how to set them up."""
  env = {k: os.environ.get(k) for k in ('JKD_REFERENCE_PYTHON', 'JKD_MAE_REPO',
                                        'JKD_SIMMIM_REPO', 'JKD_BIG_VISION_REPO')}
  missing = [k for k, v in env.items() if not v]
  if missing:
    pytest.skip(f'set {", ".join(missing)} to regenerate the import fixtures')
  script = os.path.join(FIXTURES, 'make.py')
  for argv, python in ((['torch', '--mae-repo', env['JKD_MAE_REPO'], '--simmim-repo',
                         env['JKD_SIMMIM_REPO']], env['JKD_REFERENCE_PYTHON']),
                       (['big_vision', '--big-vision-repo', env['JKD_BIG_VISION_REPO']],
                        sys.executable)):
    p = subprocess.run([python, script, *argv, '--out', str(tmp_path)], capture_output=True,
                       text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
  for name in NAMES:
    new = np.load(tmp_path / f'{name}.npz')
    old = np.load(os.path.join(FIXTURES, f'{name}.npz'))
    assert sorted(new.files) == sorted(old.files), name
    for k in old.files:
      np.testing.assert_allclose(new[k], old[k], rtol=1e-6, atol=1e-6, err_msg=f'{name} {k}')
    spec_new = json.load(open(tmp_path / f'{name}.json'))
    spec_old = json.load(open(os.path.join(FIXTURES, f'{name}.json')))
    assert spec_new['tensors'] == spec_old['tensors'], name


def test_teacher_checkpoint_is_imported_once_into_the_run(tmp_path):
  """`config.teacher.checkpoint` (CONTRACT.md): a public checkpoint file as the teacher of
  `jkd distill`, imported into WORKDIR/imported_teacher as `jkd import` would, reused when the
  command runs again, refused beside a teacher workdir or after another file."""
  _, _, path = _fixture('deit_fmnist', tmp_path)
  kd = str(tmp_path / 'kd')
  args = ('distill', '--config', f'{CONFIGS}/distill.py:tiny', '--workdir', kd,
          f'--config.teacher.checkpoint={path}', '--config.teacher.model_fields=dict(num_heads=3)')
  out = run_jkd(*args)
  assert out.returncode == 0, out.stderr
  assert 'importing the teacher' in out.stdout and 'timm_vit layout' in out.stdout, out.stdout
  imported = os.path.join(kd, 'imported_teacher')
  assert json.load(open(os.path.join(imported, 'import.json')))['fresh'] == []
  summary = json.load(open(os.path.join(kd, 'summary.json')))
  assert summary['teacher']['workdir'] == imported and 'teacher_accuracy' in summary['eval']
  again = run_jkd(*args)  # the finished run again: the teacher is not imported twice
  assert again.returncode == 0 and 'importing the teacher' not in again.stdout, again.stderr
  other = str(tmp_path / 'other.safetensors')
  shutil.copy(path, other)
  refused = run_jkd(*args[:-2], f'--config.teacher.checkpoint={other}')
  assert refused.returncode == 2 and 'keeps its teacher' in refused.stderr, refused.stderr
  both = run_jkd(*args, f'--config.teacher.workdir={imported}')
  assert both.returncode == 2 and 'both set' in both.stderr, both.stderr


def test_distilled_deit_fine_tunes_on_new_classes(tmp_path):
  """Issue 29 (a new user's path): an imported distilled DeiT (two heads) fine-tuned on another
  class count. `init_from` replaces `head_dist` as it replaces `head` (both start fresh); it
  used to refuse the run because head_dist's shape differs."""
  _, _, path = _fixture('timm_deit_distilled', tmp_path)
  w = str(tmp_path / 'deit')
  report = convert.save_workdir(path, w, build_task=trainers.build_task,
                                overrides=['model.num_heads=3'], log=lambda *_: None)
  assert report['model']['distill_token'] and report['fresh'] == []
  config = tmp_path / 'five_classes.py'
  config.write_text(f'''import ml_collections
from jkd.data import default_data_config
from jkd.defaults import base_config, shrink_for_tests

def get_config():
  c = base_config()
  c.data = default_data_config('synthetic')
  c.data.update(num_classes=5, image_size=32, channels=3, train_split='train[:64]',
                eval_split='test[:32]')
  c.model = ml_collections.ConfigDict({report['model']!r})
  shrink_for_tests(c, total_steps=2, log_every=1, checkpoint_every=2, warmup_steps=1)
  return c
''')
  ft = str(tmp_path / 'ft')
  out = run_jkd('train', '--config', str(config), '--workdir', ft, f'--config.init_from={w}',
                '--config.model.distill_token=true')
  assert out.returncode == 0, out.stderr[-3000:]
  line = next(l for l in out.stdout.splitlines() if l.startswith(f'init_from {w}'))
  assert 'head_dist' in line and 'head' in line, line
  assert json.load(open(os.path.join(ft, 'summary.json')))['status'] == 'ok'


def test_an_import_cut_off_before_its_report_is_replaced(deit_workdir, tmp_path):
  """A step-0 checkpoint without import.json is an import killed between the two writes (the
  report is written last): the next import into that workdir replaces it."""
  w, path = deit_workdir
  cut = str(tmp_path / 'cut')
  shutil.copytree(w, cut)
  os.remove(os.path.join(cut, 'import.json'))
  out = run_jkd('import', '--checkpoint', path, '--workdir', cut, '--config.model.num_heads=3')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'replacing an import that was cut off' in out.stdout, out.stdout
  report = json.load(open(os.path.join(cut, 'import.json')))
  assert report['workdir'] == cut and os.listdir(os.path.join(cut, 'checkpoints')) == ['0']
