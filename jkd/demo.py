"""`jkd demo`: pretrain -> fine-tune teacher -> student from scratch -> KD student -> compressed
student, a `jkd.pipeline` whose stages are resumable workdirs under WORKDIR, then `report.json`,
`report.md` and figures. The stages are the ordinary commands with the configs in `configs/`,
so the demo is also a worked example of chaining them.
"""
from __future__ import annotations

import time

import jax
import numpy as np

from jkd import pipeline, storage
from jkd.checkpoint import load_model
from jkd.metrics import format_duration

REPORTED = ('teacher', 'student_scratch', 'student_kd', 'student_compressed')
configs_dir = pipeline.configs_dir


def stored_bytes(workdir: str, summary: dict) -> int:
  """Bytes of the model's stored weights: the integer export if there is one, else the float32
  parameters and BatchNorm statistics as saved (projectors of a distilled student excluded)."""
  if 'export_bytes' in summary:
    return int(summary['export_bytes'])
  saved = load_model(workdir)
  leaves = jax.tree.leaves(saved.params) + jax.tree.leaves(saved.model_state)
  return int(sum(np.asarray(x).nbytes for x in leaves))


def run(config, workdir: str) -> dict:
  """Runs every stage of `config.stages` in order and writes the report. Returns report.json."""
  from jkd import figures
  t0 = time.time()
  summaries, times, stage_dirs = pipeline.run_stages(config, workdir, label='demo')
  workdir = storage.resolve(workdir)
  names = list(stage_dirs)
  report = {name: {'test_accuracy': summaries[name].get('test_accuracy'),
                   'params': summaries[name].get('params'),
                   'bytes': stored_bytes(stage_dirs[name], summaries[name]),
                   'wall_s': times[name]}
            for name in REPORTED if name in summaries}
  if 'pretrain' in summaries:
    report['pretrain'] = {'eval_loss': summaries['pretrain'].get('eval_loss'),
                          'wall_s': times['pretrain']}
  deployed = _deployed(stage_dirs.get('student_compressed'),
                       summaries.get('student_compressed', {}))
  if deployed:
    report['deployed'] = deployed
  report['scale'] = config.scale
  report['wall_s'] = round(time.time() - t0, 1)
  if jax.process_index() != 0:  # Every process ran the stages; one writes the report.
    return report
  storage.write_json(storage.join(workdir, 'report.json'), report)

  if 'pretrain' in stage_dirs:
    recon = storage.join(stage_dirs['pretrain'], 'reconstructions.png')
    if storage.exists(recon):
      storage.copy(recon, storage.join(workdir, 'reconstructions.png'))
  figures.save_training_curves(storage.join(workdir, 'training_curves.png'),
                               {n: storage.join(stage_dirs[n], 'metrics.jsonl') for n in names})
  figures.save_accuracy_vs_size(storage.join(workdir, 'accuracy_vs_size.png'),
                                {n: report[n] for n in REPORTED if n in report})
  storage.write_text(storage.join(workdir, 'report.md'), _markdown(report, config, workdir))
  print(f'[demo] report: {storage.join(workdir, "report.md")} '
        f'(total {format_duration(report["wall_s"])})', flush=True)
  return report


def _deployed(workdir: str | None, summary: dict) -> dict | None:
  """The compressed student's deployable file (config.deploy): accuracy in its runtime, size
  and latency (batch 1 and 32, 1 thread, median of 5 repeats), or None without one."""
  files = summary.get('deploy') or {}
  if not workdir or not files:
    return None
  from jkd.deploy.export import bench_file
  name, info = next((n, f) for n, f in files.items() if f['int8'] or len(files) == 1)
  path = storage.join(workdir, 'export', name)
  bench = bench_file(path, threads=1, batch_sizes=(1, 32), repeats=5, calls=10)
  return {'file': path, 'format': info['format'], 'int8': info['int8'], 'bytes': info['bytes'],
          'test_accuracy': info['accuracy'], 'runtime': bench['runtime'], 'threads': 1,
          'ms_batch1': bench['batches']['1']['ms'], 'ms_batch32': bench['batches']['32']['ms']}


def _markdown(report: dict, config, workdir: str) -> str:
  rows = ['| stage | test accuracy | params | stored bytes | time |', '|---|---|---|---|---|']
  for name in REPORTED:
    if name in report:
      r = report[name]
      acc = f'{100 * r["test_accuracy"]:.2f}%' if r['test_accuracy'] is not None else '-'
      rows.append(f'| {name} | {acc} | {r["params"]:,} | {r["bytes"]:,} | '
                  f'{format_duration(r["wall_s"])} |')
  pre = report.get('pretrain', {})
  lines = [f'# jkd demo ({config.scale})', '',
           f'Whole pipeline in {format_duration(report["wall_s"])}. MAE pretraining took '
           f'{format_duration(pre.get("wall_s", 0))} (eval loss {pre.get("eval_loss") or 0:.4f}).', '',
           *rows, '',
           *_deployed_lines(report.get('deployed')),
           '![reconstructions](reconstructions.png)', '',
           '![training curves](training_curves.png)', '',
           '![accuracy vs size](accuracy_vs_size.png)', '',
           f'Each stage\'s workdir is under `{workdir}`; rerun `jkd demo` to resume.', '']
  return '\n'.join(lines)


def _deployed_lines(d: dict | None) -> list[str]:
  if not d:
    return []
  kind = 'static int8' if d['int8'] else 'float32'
  return [f'Deployable file: `{d["file"]}` ({d["format"]}, {kind}, {d["bytes"]:,} bytes): '
          f'{100 * d["test_accuracy"]:.2f}% test accuracy in {d["runtime"]}; latency '
          f'{d["ms_batch1"]:.3f} ms at batch 1 and {d["ms_batch32"]:.3f} ms at batch 32 '
          f'({d["threads"]} thread, median of 5 repeats; `jkd bench --export FILE`).', '']
