"""The multi-host launchers in launch/: they parse, and they hand the user's jkd command on intact.

No network and no cluster: `gcloud` and `srun` are replaced by stubs on PATH that record their
argv, and the remote command line the TPU launcher builds is run through `sh -c` against a
fake worker home whose `jkd` records its argv too. That is the part that breaks silently in
real use: a `--config.mesh=dict(data=-1, fsdp=8)` that loses its quoting on the way to the
workers.
"""
import glob
import os
import re
import shutil
import stat
import subprocess
import time

import pytest
import yaml  # comes with flax, orbax and ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
TPU_POD = os.path.join(LAUNCH, 'tpu_pod.sh')
SBATCH = os.path.join(LAUNCH, 'slurm.sbatch')
JOBSET = os.path.join(LAUNCH, 'gke_jobset.yaml')

# Arguments with spaces, '=', parentheses, a quote and a '$': each must arrive unchanged.
USER_COMMAND = ['jkd', 'pretrain', '--config', 'configs/imagenet/mae_vit_b16.py:800',
                '--workdir', '/shared/runs/mae b16', '--config.mesh=dict(data=-1, fsdp=8)',
                "--config.note=it's $HOME"]

# Records one invocation: argv NUL-separated into a numbered file, so calls keep their order.
RECORDER = """#!/bin/sh
log_dir={log_dir}
n=$(ls "$log_dir" | wc -l)
printf '%s\\0' {name} "$@" > "$log_dir/$(printf %03d "$n")-{name}"
{extra}
"""


def _write_executable(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _stub(bin_dir, log_dir, name, extra=''):
  os.makedirs(log_dir, exist_ok=True)
  _write_executable(os.path.join(bin_dir, name),
                    RECORDER.format(log_dir=log_dir, name=name, extra=extra))


def _calls(log_dir):
  """The recorded invocations, in order, as argv lists."""
  calls = []
  for path in sorted(glob.glob(os.path.join(log_dir, '*'))):
    with open(path, 'rb') as f:
      calls.append(f.read().decode().split('\0')[:-1])
  return calls


def _env(bin_dir, **extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('SLURM_', 'TPU_', 'JKD_', 'JAX_'))}
  env['PATH'] = bin_dir + os.pathsep + env['PATH']
  env.update(extra)
  return env


def _remote_command(call):
  assert '--command' in call, call
  return call[call.index('--command') + 1]


# --- shell syntax --------------------------------------------------------------------------

# benchmarks/gpu/prepare.sh fills .carry/ for the lent GPU machine (benchmarks/gpu/session.py).
SCRIPTS = sorted(glob.glob(os.path.join(LAUNCH, '*.sh')) + [SBATCH, os.path.join(
    os.path.dirname(LAUNCH), 'benchmarks', 'gpu', 'prepare.sh')])


@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
def test_shell_script_parses(script):
  result = subprocess.run(['bash', '-n', script], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert os.access(script, os.X_OK) or script.endswith('.sbatch'), f'{script} is not executable'


@pytest.mark.skipif(shutil.which('shellcheck') is None, reason='shellcheck not installed')
@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
def test_shellcheck(script):
  result = subprocess.run(['shellcheck', '-S', 'warning', script], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


# --- SLURM ---------------------------------------------------------------------------------

def _sbatch_directives():
  """`#SBATCH` options as sbatch reads them: only those before the first command line."""
  options = {}
  with open(SBATCH) as f:
    lines = f.read().splitlines()
  assert lines[0].startswith('#!'), 'sbatch needs a shebang line'
  for line in lines[1:]:
    stripped = line.strip()
    if stripped and not stripped.startswith('#'):
      break  # sbatch stops reading directives here
    if stripped.startswith('#SBATCH'):
      match = re.fullmatch(r'#SBATCH\s+--([a-z-]+)(?:=(\S+))?', stripped)
      assert match, f'cannot parse {line!r}'
      options[match[1]] = match[2]
  return options, lines


def test_sbatch_directives():
  options, lines = _sbatch_directives()
  assert int(options['nodes']) >= 2
  assert options['ntasks-per-node'] == '8'   # one process per GPU
  assert options['gpus-per-node'] == '8'
  after = lines[lines.index(next(l for l in lines[1:] if l.strip() and not l.startswith('#'))):]
  assert not any(l.strip().startswith('#SBATCH') for l in after), 'directive after a command'


def test_sbatch_runs_command_through_srun(tmp_path):
  bin_dir, log_dir = str(tmp_path / 'bin'), str(tmp_path / 'log')
  _stub(bin_dir, log_dir, 'srun', extra='env > "$log_dir/../srun.env"')
  env = _env(bin_dir, SLURM_JOB_ID='123', SLURM_JOB_NUM_NODES='2', SLURM_NTASKS_PER_NODE='8',
             SLURM_CPUS_PER_TASK='8', JKD_VENV=str(tmp_path / 'no-venv'))
  result = subprocess.run(['bash', SBATCH, *USER_COMMAND], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=30)
  assert result.returncode == 0, result.stderr
  [call] = _calls(log_dir)
  assert call[0] == 'srun'
  assert call[-len(USER_COMMAND):] == USER_COMMAND  # quoting preserved
  options = call[1:-len(USER_COMMAND)]
  assert '--kill-on-bad-exit=1' in options and '--cpus-per-task=8' in options
  srun_env = (tmp_path / 'srun.env').read_text().splitlines()
  assert 'JKD_DISTRIBUTED=on' in srun_env
  assert not any(l.startswith('JAX_LOCAL_DEVICE_IDS=') for l in srun_env)  # JAX binds by LOCALID


def test_sbatch_one_process_per_node_sees_all_gpus(tmp_path):
  bin_dir, log_dir = str(tmp_path / 'bin'), str(tmp_path / 'log')
  _stub(bin_dir, log_dir, 'srun', extra='env > "$log_dir/../srun.env"')
  env = _env(bin_dir, SLURM_NTASKS_PER_NODE='1', JKD_VENV=str(tmp_path / 'no-venv'))
  result = subprocess.run(['bash', SBATCH, 'jkd', 'bench', '--workdir', '/shared/b'],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=30)
  assert result.returncode == 0, result.stderr
  assert 'JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7' in (tmp_path / 'srun.env').read_text().split()


def test_sbatch_without_command_is_usage_error(tmp_path):
  result = subprocess.run(['bash', SBATCH], cwd=str(tmp_path), env=_env(str(tmp_path)),
                          capture_output=True, text=True, timeout=30)
  assert result.returncode == 2 and 'usage' in result.stderr


# --- TPU pod -------------------------------------------------------------------------------

def _fake_worker(tmp_path):
  """A worker's $HOME with the code dir `jkd` whose venv `jkd` records argv and environment."""
  home = tmp_path / 'worker'
  venv_bin = home / 'jkd' / '.venv' / 'bin'
  _write_executable(str(venv_bin / 'activate'), 'PATH="$PWD/.venv/bin:$PATH"; export PATH\n')
  _write_executable(str(venv_bin / 'jkd'),
                    '#!/bin/sh\nprintf "%s\\0" jkd "$@" > "$HOME/argv"\n'
                    # env appears whole (mv), so a reader polling for it never sees half a file.
                    'env > "$HOME/env.tmp" && mv "$HOME/env.tmp" "$HOME/env"\n')
  return home


def _run_on_worker(home, remote_command, shell='sh'):
  env = dict(os.environ, HOME=str(home))
  result = subprocess.run([shell, '-c', remote_command], cwd=str(home), env=env,
                          capture_output=True, text=True, timeout=30)
  assert result.returncode == 0, result.stderr
  return result


def _worker_argv(home, wait_s=0.0):
  deadline = time.monotonic() + wait_s
  while not (home / 'env').exists() and time.monotonic() < deadline:
    time.sleep(0.05)  # a detached run finishes on its own time
  return (home / 'argv').read_bytes().decode().split('\0')[:-1], \
      (home / 'env').read_text().splitlines()


def _tpu_pod(tmp_path, *options):
  bin_dir, log_dir = str(tmp_path / 'bin'), str(tmp_path / 'log')
  _stub(bin_dir, log_dir, 'gcloud')
  result = subprocess.run(['bash', TPU_POD, *options, '--', *USER_COMMAND], env=_env(bin_dir),
                          capture_output=True, text=True, timeout=60)
  return result, _calls(log_dir)


def test_tpu_pod_creates_copies_installs_and_runs_on_all_workers(tmp_path):
  result, calls = _tpu_pod(tmp_path, '--tpu', 'my-pod', '--zone', 'us-east5-a',
                           '--project', 'my-proj', '--create', 'v5p-64', 'v2-alpha-tpuv5',
                           '--env', 'TFDS_DATA_DIR=/gcs/b/tfds dir')
  assert result.returncode == 0, result.stderr
  create, scp, install, run = calls
  assert create[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'my-pod']
  assert {'--accelerator-type=v5p-64', '--version=v2-alpha-tpuv5'} <= set(create)
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in scp
  for call in (install, run):
    assert call[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-pod']
    assert '--worker=all' in call
  for call in calls:
    assert call[call.index('--zone') + 1] == 'us-east5-a'
    assert call[call.index('--project') + 1] == 'my-proj'
  # The copied tarball is this checkout's code.
  tarball = scp[5]
  assert tarball.endswith('.tar.gz') and scp[6] == 'my-pod:jkd-src.tar.gz'
  setup = _remote_command(install)
  assert "pip install --quiet -e '.[gcs]' 'jax[tpu]'" in setup
  assert subprocess.run(['sh', '-n', '-c', setup]).returncode == 0

  # The run command, executed as a worker's shell would, reaches jkd unchanged.
  for shell in ('sh', 'bash'):
    home = _fake_worker(tmp_path / shell)
    _run_on_worker(home, _remote_command(run), shell)
    argv, env = _worker_argv(home)
    assert argv == USER_COMMAND
    assert 'JKD_DISTRIBUTED=on' in env and 'TFDS_DATA_DIR=/gcs/b/tfds dir' in env


def test_tpu_pod_tarball_holds_the_checkout(tmp_path):
  """The scp'd tarball has the package and configs, not the venv: checked by listing it."""
  bin_dir, log_dir = str(tmp_path / 'bin'), str(tmp_path / 'log')
  # Keep the tarball: the stub copies it out before the launcher's temp dir is removed.
  _stub(bin_dir, log_dir, 'gcloud',
        extra='[ "$4" = scp ] && cp "$5" "$log_dir/../src.tar.gz"; exit 0')
  result = subprocess.run(['bash', TPU_POD, '--tpu', 't', '--zone', 'z', '--', 'jkd', 'bench'],
                          env=_env(bin_dir), capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  names = subprocess.run(['tar', '-tzf', str(tmp_path / 'src.tar.gz')], capture_output=True,
                         text=True, check=True).stdout.split()
  assert 'pyproject.toml' in names and 'jkd/cli.py' in names and 'launch/tpu_pod.sh' in names
  assert not any(n.startswith('.venv/') for n in names)


def test_tpu_pod_clone_and_detach(tmp_path):
  result, calls = _tpu_pod(tmp_path, '--tpu', 'my-pod', '--zone', 'z',
                           '--repo-url', 'https://example.com/jkd.git', '--ref', 'v1.0',
                           '--detach')
  assert result.returncode == 0, result.stderr
  install, run = calls  # no create, no scp: the workers clone
  assert all('--worker=all' in call and '--project' not in call for call in calls)
  setup = _remote_command(install)
  assert "git clone --quiet 'https://example.com/jkd.git'" in setup and "'v1.0'" in setup
  assert subprocess.run(['sh', '-n', '-c', setup]).returncode == 0
  home = _fake_worker(tmp_path)
  out = _run_on_worker(home, _remote_command(run)).stdout
  assert 'jkd.log' in out
  argv, env = _worker_argv(home, wait_s=5)
  assert argv == USER_COMMAND and 'JKD_DISTRIBUTED=on' in env


def test_tpu_pod_env_defaults_and_errors(tmp_path):
  bin_dir, log_dir = str(tmp_path / 'bin'), str(tmp_path / 'log')
  _stub(bin_dir, log_dir, 'gcloud')
  env = _env(bin_dir, TPU_NAME='env-pod', TPU_ZONE='env-zone')
  ok = subprocess.run(['bash', TPU_POD, '--skip-setup', '--', *USER_COMMAND], env=env,
                      capture_output=True, text=True, timeout=30)
  assert ok.returncode == 0, ok.stderr
  [run] = _calls(log_dir)
  assert run[5] == 'env-pod' and run[run.index('--zone') + 1] == 'env-zone'
  for args, message in [(['--tpu', 't', '--', 'jkd'], 'zone'),
                        (['--tpu', 't', '--zone', 'z'], 'no command'),
                        (['--tpu', 't', '--zone', 'z', '--bogus', '--', 'jkd'], 'unknown option')]:
    bad = subprocess.run(['bash', TPU_POD, *args], env=_env(bin_dir), capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and message in bad.stderr, bad.stderr
  assert len(_calls(log_dir)) == 1  # errors run no gcloud


# --- GKE JobSet ----------------------------------------------------------------------------

def _jobset_docs():
  with open(JOBSET) as f:
    text = f.read()
  docs = [d for d in yaml.safe_load_all(text) if d]
  # The commented TPU variant: the block of '# '-prefixed lines from its apiVersion on.
  lines = text.splitlines()
  start = lines.index('# apiVersion: jobset.x-k8s.io/v1alpha2')
  tpu = yaml.safe_load('\n'.join(l[2:] for l in lines[start:] if l.startswith('# ')))
  return docs, tpu


def _pod_spec(jobset):
  [rjob] = jobset['spec']['replicatedJobs']
  return rjob, rjob['template']['spec'], rjob['template']['spec']['template']['spec']


def test_jobset_gpu():
  docs, _ = _jobset_docs()
  [jobset] = [d for d in docs if d['kind'] == 'JobSet']
  assert jobset['apiVersion'] == 'jobset.x-k8s.io/v1alpha2'
  rjob, job, pod = _pod_spec(jobset)
  assert job['completionMode'] == 'Indexed'
  assert job['parallelism'] == job['completions'] >= 2
  [container] = pod['containers']
  env = {e['name']: e for e in container['env']}
  assert env['JKD_DISTRIBUTED']['value'] == 'on'
  assert int(env['JAX_NUM_PROCESSES']['value']) == job['parallelism']
  assert (env['JAX_PROCESS_ID']['valueFrom']['fieldRef']['fieldPath']
          == "metadata.annotations['batch.kubernetes.io/job-completion-index']")
  # Pod 0 of job 0, through the JobSet's headless service (named after the JobSet by default).
  name = jobset['metadata']['name']
  subdomain = jobset['spec'].get('network', {}).get('subdomain', name)
  host, port = env['JAX_COORDINATOR_ADDRESS']['value'].rsplit(':', 1)
  assert host == f"{name}-{rjob['name']}-0-0.{subdomain}"
  assert int(port) in [p['containerPort'] for p in container.get('ports', [])]
  assert container['resources']['limits']['nvidia.com/gpu'] == 8
  command = container['command']
  assert command[0] == 'jkd' and '--workdir' in command
  assert '--config.mesh=dict(data=-1, fsdp=8)' in command
  # The workdir is on a volume every pod shares.
  workdir = command[command.index('--workdir') + 1]
  mount = next(m for m in container['volumeMounts'] if workdir.startswith(m['mountPath'] + '/'))
  volume = next(v for v in pod['volumes'] if v['name'] == mount['name'])
  [pvc] = [d for d in docs if d['kind'] == 'PersistentVolumeClaim']
  assert volume['persistentVolumeClaim']['claimName'] == pvc['metadata']['name']
  assert 'ReadWriteMany' in pvc['spec']['accessModes']


def test_jobset_tpu_variant():
  _, tpu = _jobset_docs()
  assert tpu['kind'] == 'JobSet'
  _, job, pod = _pod_spec(tpu)
  assert job['parallelism'] == job['completions'] and job['completionMode'] == 'Indexed'
  assert {'cloud.google.com/gke-tpu-accelerator',
          'cloud.google.com/gke-tpu-topology'} <= set(pod['nodeSelector'])
  [container] = pod['containers']
  assert 'google.com/tpu' in container['resources']['limits']
  env = {e['name']: e.get('value') for e in container['env']}
  assert env == {'JKD_DISTRIBUTED': 'on'}  # JAX reads the slice's layout itself
