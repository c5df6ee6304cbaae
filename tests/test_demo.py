"""`jkd demo` in its fast mode: every stage runs, report.json has every key, figures exist."""
import json
import os

from conftest import run_jkd

REPORT_KEYS = ('teacher', 'student_scratch', 'student_kd', 'student_compressed')


def test_demo_fast_end_to_end_and_resume(tmp_path):
  w = str(tmp_path / 'demo')
  out = run_jkd('demo', '--workdir', w, '--config', 'configs/demo.py:fast')
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.count('[demo] stage') >= 10  # a start and an end line per stage
  report = json.load(open(os.path.join(w, 'report.json')))
  for key in REPORT_KEYS:
    for field in ('test_accuracy', 'params', 'bytes'):
      assert report[key][field] is not None, (key, field)
  assert 'wall_s' in report
  # The compressed student is stored as integers: at least 3.5x smaller than the fp32 student.
  assert report['student_compressed']['bytes'] * 3.5 < report['student_kd']['bytes']
  assert report['student_kd']['params'] < report['teacher']['params']
  for png in ('reconstructions.png', 'training_curves.png', 'accuracy_vs_size.png'):
    with open(os.path.join(w, png), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  md = open(os.path.join(w, 'report.md')).read()
  assert '| student_compressed |' in md
  # It ends with the deployable file (static int8 ONNX) and its latency in ONNX Runtime.
  deployed = report['deployed']
  assert deployed['format'] == 'onnx' and deployed['int8'] and os.path.isfile(deployed['file'])
  assert deployed['ms_batch1'] > 0 and deployed['ms_batch32'] > 0
  assert 'Deployable file:' in md
  # Running it again resumes: every stage is skipped.
  out = run_jkd('demo', '--workdir', w, '--config', 'configs/demo.py:fast')
  assert out.returncode == 0 and out.stdout.count('already done') == 5, out.stdout[-2000:]
