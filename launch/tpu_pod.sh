#!/usr/bin/env bash
# Runs one jkd command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh [options] -- jkd pretrain --config configs/imagenet/mae_vit_b16.py \
#       --workdir gs://my-bucket/mae_b16 --config.data.data_dir=gs://my-bucket/tfds
#
# Steps, each on all workers at once (gcloud ... --worker=all):
#   1. (--create only) create the TPU VM slice;
#   2. ship the code: this checkout's files (tracked + untracked, not git-ignored) as a tarball
#      via `tpu-vm scp`, or `git clone` of --repo-url;
#   3. install: a Python 3.12 venv in the code directory, `pip install -e '.[gcs]' 'jax[tpu]'`
#      (gcsfs, for gs:// workdirs and data dirs);
#   4. run the command with JKD_DISTRIBUTED=on: every worker calls jax.distributed.initialize(),
#      which reads the slice's layout from the TPU VM metadata server (nothing else to set).
# The command's --workdir must be one path every worker shares (see launch/README.md): a
# worker-local directory would give each host a different checkpoint history.
#
# Options (each also readable from the environment variable in brackets):
#   --tpu NAME                TPU VM name                                 [TPU_NAME]
#   --zone ZONE               e.g. us-east5-a                             [TPU_ZONE]
#   --project PROJECT         default: gcloud's configured project        [TPU_PROJECT]
#   --create ACCEL VERSION    create the slice first, e.g. --create v5p-64 v2-alpha-tpuv5;
#                             extra create flags (--spot, --reserved) in  [TPU_CREATE_FLAGS]
#   --repo-url URL            git clone URL on the workers instead of copying this checkout
#                                                                         [JKD_REPO_URL]
#   --ref REF                 branch, tag or commit of --repo-url (default: its HEAD)
#                                                                         [JKD_REPO_REF]
#   --remote-dir DIR          code directory on the workers (default: jkd, under $HOME)
#                                                                         [JKD_REMOTE_DIR]
#   --python VERSION          Python of the workers' venv (default: 3.12) [JKD_PYTHON]
#   --env KEY=VALUE           extra environment for the jkd processes (repeatable), e.g.
#                             --env TFDS_DATA_DIR=... --env LIBTPU_INIT_ARGS=...
#   --gcloud-flag FLAG        extra flag for every `tpu-vm ssh/scp` (repeatable), e.g.
#                             --gcloud-flag=--internal-ip or --gcloud-flag=--tunnel-through-iap
#   --skip-setup              run only step 4 (code and venv already on the workers)
#   --detach                  start the command in the background on every worker (nohup),
#                             appending its output to DIR/jkd.log, and return at once
#   --dry-run                 print the gcloud commands instead of running them
#   -h, --help                this text
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "tpu_pod.sh: $*" >&2; echo "Run launch/tpu_pod.sh --help for the options." >&2; exit 2; }

# Quotes one word for a POSIX shell: the remote side runs our command through the worker's
# login shell, so every argument of the user's command must survive one more parse.
quote() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }
quote_all() { local out='' w; for w in "$@"; do out+="${out:+ }$(quote "$w")"; done; printf '%s' "$out"; }

tpu=${TPU_NAME:-}
zone=${TPU_ZONE:-}
project=${TPU_PROJECT:-}
repo_url=${JKD_REPO_URL:-}
ref=${JKD_REPO_REF:-}
remote_dir=${JKD_REMOTE_DIR:-jkd}
python_version=${JKD_PYTHON:-3.12}
create_accel='' create_version='' setup=1 detach=0 dry_run=0
extra_env=() gcloud_flags=()
read -r -a create_flags <<< "${TPU_CREATE_FLAGS:-}"

while (( $# )); do
  case $1 in
    --tpu) tpu=${2:?--tpu needs a name}; shift 2 ;;
    --zone) zone=${2:?--zone needs a zone}; shift 2 ;;
    --project) project=${2:?--project needs a project}; shift 2 ;;
    --create)
      (( $# >= 3 )) || die '--create needs ACCELERATOR_TYPE and VERSION (e.g. --create v5p-64 v2-alpha-tpuv5)'
      create_accel=$2 create_version=$3; shift 3 ;;
    --repo-url) repo_url=${2:?--repo-url needs a URL}; shift 2 ;;
    --ref) ref=${2:?--ref needs a branch, tag or commit}; shift 2 ;;
    --remote-dir) remote_dir=${2:?--remote-dir needs a path}; shift 2 ;;
    --python) python_version=${2:?--python needs a version}; shift 2 ;;
    --env)
      [[ ${2:-} == *=* ]] || die "--env takes KEY=VALUE, got '${2:-}'"
      extra_env+=("$2"); shift 2 ;;
    --env=*) [[ ${1#--env=} == *=* ]] || die "--env takes KEY=VALUE, got '${1#--env=}'"
      extra_env+=("${1#--env=}"); shift ;;
    --gcloud-flag) gcloud_flags+=("${2:?--gcloud-flag needs a flag}"); shift 2 ;;
    --gcloud-flag=*) gcloud_flags+=("${1#--gcloud-flag=}"); shift ;;
    --skip-setup) setup=0; shift ;;
    --detach) detach=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (the jkd command goes after --)" ;;
  esac
done
command=("$@")

[[ -n $tpu ]] || die 'no TPU name: pass --tpu NAME or set TPU_NAME'
[[ -n $zone ]] || die 'no zone: pass --zone ZONE or set TPU_ZONE'
(( ${#command[@]} )) || die 'no command: put it after --, e.g. -- jkd pretrain --config FILE.py --workdir DIR'

# A relative workdir would resolve inside each worker's own code directory: the hosts would
# not share checkpoints, and each would resume (or not) on its own.
for (( i = 0; i < ${#command[@]}; i++ )); do
  case ${command[i]} in
    --workdir=*) workdir=${command[i]#--workdir=} ;;
    --workdir) workdir=${command[i+1]:-} ;;
    *) continue ;;
  esac
  if [[ $workdir != /* && $workdir != gs://* ]]; then
    echo "tpu_pod.sh: warning: --workdir '$workdir' is relative: every worker would write its" \
         "own copy. Use a path all workers share (see launch/README.md)." >&2
  fi
done

where=(--zone "$zone")
[[ -n $project ]] && where+=(--project "$project")

run() {
  if (( dry_run )); then quote_all "$@"; echo; else "$@"; fi
}
on_all_workers() {  # on_all_workers REMOTE_SHELL_COMMAND
  run gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker=all \
    ${gcloud_flags[@]+"${gcloud_flags[@]}"} --command "$1"
}

dir_q=$(quote "$remote_dir")

if [[ -n $create_accel ]]; then
  echo "tpu_pod.sh: creating $tpu ($create_accel, $create_version) in $zone" >&2
  run gcloud compute tpus tpu-vm create "$tpu" "${where[@]}" \
    --accelerator-type="$create_accel" --version="$create_version" \
    ${create_flags[@]+"${create_flags[@]}"}
fi

if (( setup )); then
  if [[ -n $repo_url ]]; then
    echo "tpu_pod.sh: cloning $repo_url${ref:+ @ $ref} on every worker" >&2
    fetch="{ [ -d $dir_q/.git ] || git clone --quiet $(quote "$repo_url") $dir_q; } && \
git -C $dir_q fetch --quiet origin $(quote "${ref:-HEAD}") && \
git -C $dir_q checkout --quiet --detach FETCH_HEAD"
  else
    repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    tarball=$tmp/jkd-src.tar.gz
    # Tracked and untracked-but-not-ignored files: what `git status` calls this checkout,
    # uncommitted edits included, without .venv/, runs/ or other build output.
    if git -C "$repo_root" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
      git -C "$repo_root" ls-files -z --cached --others --exclude-standard \
        | tar -C "$repo_root" --null --ignore-failed-read -T - -czf "$tarball"
    else
      tar -C "$repo_root" --exclude=./.venv --exclude=./runs --exclude=./.git -czf "$tarball" .
    fi
    echo "tpu_pod.sh: copying $repo_root ($(du -h "$tarball" | cut -f1)) to every worker" >&2
    run gcloud compute tpus tpu-vm scp "$tarball" "$tpu:jkd-src.tar.gz" "${where[@]}" \
      --worker=all ${gcloud_flags[@]+"${gcloud_flags[@]}"}
    fetch="mkdir -p $dir_q && tar -xzf jkd-src.tar.gz -C $dir_q && rm -f jkd-src.tar.gz"
  fi
  # TPU VM images ship an older system Python (3.10 on Ubuntu 22.04) than jkd needs: use the
  # wanted python if the image has it, else let uv fetch one.
  py=$(quote "python$python_version")
  install="set -e; $fetch; cd $dir_q; \
if [ ! -x .venv/bin/python ]; then \
if command -v $py > /dev/null; then $py -m venv .venv; else \
command -v uv > /dev/null || [ -x \"\$HOME/.local/bin/uv\" ] || \
curl -LsSf https://astral.sh/uv/install.sh | sh -s -- --quiet; \
PATH=\"\$HOME/.local/bin:\$PATH\" uv venv --quiet --seed --python $(quote "$python_version") .venv; fi; fi; \
.venv/bin/pip install --quiet --upgrade pip && \
.venv/bin/pip install --quiet -e '.[gcs]' 'jax[tpu]'"
  echo "tpu_pod.sh: installing jkd and jax[tpu] on every worker" >&2
  on_all_workers "$install"
fi

# JKD_DISTRIBUTED=on: jkd joins the multi-host run before touching a device; JAX finds the
# coordinator, process count and process id from the TPU metadata on its own.
env_words=''
if (( ${#extra_env[@]} )); then env_words="$(quote_all "${extra_env[@]}") "; fi
job=". .venv/bin/activate && exec env JKD_DISTRIBUTED=on $env_words$(quote_all "${command[@]}")"
if (( detach )); then
  # setsid + nohup: the run outlives this ssh session (a laptop going to sleep must not end it).
  job="cd $dir_q && { nohup setsid bash -c $(quote "$job") >> jkd.log 2>&1 < /dev/null & } && \
echo \"started on \$(hostname), log: \$PWD/jkd.log\""
else
  job="cd $dir_q && $job"
fi
echo "tpu_pod.sh: running on every worker of $tpu: ${command[*]}" >&2
on_all_workers "$job"
