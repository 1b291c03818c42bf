"""launch/tpu_pod.sh and launch/gpu_slurm.sh: the --dry-run output, that a dry run runs nothing,
that a real run runs exactly the printed commands (gcloud, tar, srun, sbatch replaced by
recorders on PATH), that the trainer's arguments arrive unchanged, and one-line errors."""

import json
import os
import shlex
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "launch", "tpu_pod.sh")
SLURM = os.path.join(REPO, "launch", "gpu_slurm.sh")
TPU_ENV = {"TPU_NAME": "vidssm", "ZONE": "us-east5-a", "ACCELERATOR_TYPE": "v5p-64"}
SLURM_ENV = {"NODES": "2", "GPUS_PER_NODE": "8"}
MAIN = ["--config=configs/endomamba.py", "--workdir=gs://bucket/run"]
# An argument a naive launcher would break: spaces, quotes, a dollar sign, a glob.
AWKWARD = "--config.data.dir=/data/it's a \"dir\" $HOME/*"

RECORDER = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["RECORD"], "a") as f:
  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
  if os.environ.get("VIDSSM_LOCAL_DEVICE_IDS"):
    f.write(json.dumps(["VIDSSM_LOCAL_DEVICE_IDS", os.environ["VIDSSM_LOCAL_DEVICE_IDS"]]) + "\\n")
"""


@pytest.fixture
def fake_bin(tmp_path):
  """A PATH prefix where gcloud, tar, srun and sbatch only record their argv to RECORD."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "tar", "srun", "sbatch"):
    p = bin_dir / name
    p.write_text(RECORDER)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
  return bin_dir


def launch(script, args, env, fake_bin, tmp_path):
  record = tmp_path / "record.jsonl"
  full_env = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "HOME": str(tmp_path),
              "RECORD": str(record), **env}
  out = subprocess.run(["bash", script, *args], env=full_env, capture_output=True, text=True,
                       timeout=60)
  ran = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
  return out, ran


def commands(stdout):
  """The printed commands (comment lines dropped), each as the argv a shell would give it."""
  return [shlex.split(line) for line in stdout.splitlines() if not line.startswith("#")]


def test_tpu_dry_run_prints_every_command_and_runs_none(fake_bin, tmp_path):
  out, ran = launch(TPU, ["--dry-run", "--", *MAIN], TPU_ENV, fake_bin, tmp_path)
  assert out.returncode == 0, out.stderr
  assert ran == []
  assert out.stdout.splitlines() == [
      "gcloud compute tpus tpu-vm describe vidssm --zone=us-east5-a '--format=value(state)'",
      "# when the describe above finds nothing:",
      "gcloud compute tpus tpu-vm create vidssm --zone=us-east5-a --accelerator-type=v5p-64 "
      "--version=tpu-ubuntu2204-base",
      f"tar -czf /tmp/vidssm_jax-vidssm.tgz -C {REPO} --exclude=.git --exclude=.venv "
      "--exclude=.whl --exclude=__pycache__ .",
      "gcloud compute tpus tpu-vm scp /tmp/vidssm_jax-vidssm.tgz vidssm:vidssm_jax.tgz "
      "--zone=us-east5-a --worker=all",
      "gcloud compute tpus tpu-vm ssh vidssm --zone=us-east5-a --worker=all --command 'set -e; "
      "rm -rf ~/vidssm_jax && mkdir -p ~/vidssm_jax && tar -xzf ~/vidssm_jax.tgz -C ~/vidssm_jax; "
      "[ -d ~/vidssm_venv ] || python3 -m venv ~/vidssm_venv; ~/vidssm_venv/bin/pip install -q -U "
      "pip; ~/vidssm_venv/bin/pip install -q \"jax[tpu]\" -e \"$HOME/vidssm_jax[video]\"'",
      "gcloud compute tpus tpu-vm ssh vidssm --zone=us-east5-a --worker=all --command 'cd "
      "~/vidssm_jax && ~/vidssm_venv/bin/python -m vidssm_jax.main --multihost "
      "--config=configs/endomamba.py --workdir=gs://bucket/run'",
  ]


def test_tpu_run_executes_exactly_the_dry_run_commands(fake_bin, tmp_path):
  args = ["--", *MAIN, AWKWARD]
  dry, _ = launch(TPU, ["--dry-run", *args], TPU_ENV, fake_bin, tmp_path)
  out, ran = launch(TPU, args, TPU_ENV, fake_bin, tmp_path)
  assert out.returncode == 0, out.stderr
  # The recorder's describe prints nothing (no such TPU), so the create runs too.
  assert ran == commands(dry.stdout)
  # On every worker the remote shell rebuilds the trainer's argv: exactly what followed `--`.
  remote = shlex.split(ran[-1][ran[-1].index("--command") + 1])
  assert remote[remote.index("vidssm_jax.main") + 1:] == ["--multihost", *MAIN, AWKWARD]
  assert ran[-1][:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and "--worker=all" in ran[-1]


def test_tpu_queued_resource_waits_for_active(fake_bin, tmp_path):
  out, _ = launch(TPU, ["--dry-run", "--queued", "--spot", "--", *MAIN],
                  dict(TPU_ENV, PROJECT="my-proj"), fake_bin, tmp_path)
  cmds = commands(out.stdout)
  assert cmds[1] == ["gcloud", "compute", "tpus", "queued-resources", "create", "vidssm",
                     "--node-id=vidssm", "--zone=us-east5-a", "--project=my-proj",
                     "--accelerator-type=v5p-64", "--runtime-version=tpu-ubuntu2204-base",
                     "--spot"]
  assert cmds[2] == cmds[0] and "--format=value(state.state)" in cmds[0]
  assert "# then, every 30 s until it prints ACTIVE:" in out.stdout
  assert all("--project=my-proj" in c for c in cmds if c[0] == "gcloud")


@pytest.mark.parametrize("missing", ["TPU_NAME", "ZONE", "ACCELERATOR_TYPE"])
def test_tpu_missing_setting_is_one_line_and_exit_2(missing, fake_bin, tmp_path):
  env = {k: v for k, v in TPU_ENV.items() if k != missing}
  out, ran = launch(TPU, ["--dry-run", "--", *MAIN], env, fake_bin, tmp_path)
  assert out.returncode == 2 and out.stdout == "" and ran == []
  assert out.stderr.startswith(f"tpu_pod.sh: set {missing} ") and out.stderr.count("\n") == 1


def test_tpu_without_trainer_arguments_or_with_a_bad_option(fake_bin, tmp_path):
  out, _ = launch(TPU, ["--dry-run"], TPU_ENV, fake_bin, tmp_path)
  assert out.returncode == 2 and "no trainer arguments" in out.stderr
  out, _ = launch(TPU, ["--dryrun", "--", *MAIN], TPU_ENV, fake_bin, tmp_path)
  assert out.returncode == 2 and "unknown option --dryrun" in out.stderr


def test_slurm_dry_run_one_process_per_gpu(fake_bin, tmp_path):
  out, ran = launch(SLURM, ["--dry-run", "--", *MAIN], SLURM_ENV, fake_bin, tmp_path)
  assert out.returncode == 0, out.stderr
  assert ran == []
  assert out.stdout.splitlines() == [
      "env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 srun --job-name=vidssm_jax --nodes=2 "
      "--ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=8 --time=24:00:00 "
      "--signal=USR1@300 --kill-on-bad-exit=1 python3 -m vidssm_jax.main --multihost "
      "--config=configs/endomamba.py --workdir=gs://bucket/run"]


def test_slurm_sbatch_per_host_runs_what_it_prints(fake_bin, tmp_path):
  env = dict(SLURM_ENV, NODES="3", GPUS_PER_NODE="4", PARTITION="gpu", ACCOUNT="lab",
             TIME="2:00:00")
  args = ["--sbatch", "--per-host", "--", *MAIN, AWKWARD]
  dry, _ = launch(SLURM, ["--dry-run", *args], env, fake_bin, tmp_path)
  assert dry.returncode == 0, dry.stderr
  (cmd,) = commands(dry.stdout)
  assert cmd[:3] == ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
                     "VIDSSM_LOCAL_DEVICE_IDS=0,1,2,3"]
  assert cmd[3:13] == ["sbatch", "--job-name=vidssm_jax", "--nodes=3", "--ntasks-per-node=1",
                       "--gpus-per-node=4", "--cpus-per-task=32", "--time=2:00:00",
                       "--signal=USR1@300", "--partition=gpu", "--account=lab"]
  wrapped = shlex.split(cmd[cmd.index("--wrap") + 1])
  assert wrapped == ["srun", "--kill-on-bad-exit=1", "python3", "-m", "vidssm_jax.main",
                     "--multihost", *MAIN, AWKWARD]
  out, ran = launch(SLURM, args, env, fake_bin, tmp_path)
  assert out.returncode == 0, out.stderr
  assert ran == [cmd[3:], ["VIDSSM_LOCAL_DEVICE_IDS", "0,1,2,3"]]


@pytest.mark.parametrize("env,message", [
    ({"GPUS_PER_NODE": "8"}, "set NODES "),
    ({"NODES": "2"}, "set GPUS_PER_NODE "),
    ({"NODES": "two", "GPUS_PER_NODE": "8"}, "NODES=two is not a positive integer"),
    ({"NODES": "2", "GPUS_PER_NODE": "0"}, "GPUS_PER_NODE=0 is not a positive integer"),
])
def test_slurm_bad_settings_are_one_line_and_exit_2(env, message, fake_bin, tmp_path):
  out, ran = launch(SLURM, ["--dry-run", "--", *MAIN], env, fake_bin, tmp_path)
  assert out.returncode == 2 and out.stdout == "" and ran == []
  assert out.stderr.startswith(f"gpu_slurm.sh: {message}") and out.stderr.count("\n") == 1


def test_local_device_ids_reach_jax_distributed(monkeypatch):
  import jax
  from vidssm_jax.train import sharding
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setenv("VIDSSM_LOCAL_DEVICE_IDS", "0,1,2,3")
  sharding.maybe_initialize_distributed(True)
  monkeypatch.delenv("VIDSSM_LOCAL_DEVICE_IDS")
  sharding.maybe_initialize_distributed(True)
  sharding.maybe_initialize_distributed(False)
  assert calls == [{"local_device_ids": [0, 1, 2, 3]}, {}]
  monkeypatch.setenv("VIDSSM_LOCAL_DEVICE_IDS", "all")
  with pytest.raises(ValueError, match="expected device numbers"):
    sharding.maybe_initialize_distributed(True)


def test_no_package_registry_host_is_named_in_the_repo():
  files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
  hosts = ("pypi" + ".org", "files." + "pythonhosted")
  for f in files:
    path = os.path.join(REPO, f)
    if os.path.isfile(path):
      text = open(path, errors="ignore").read()
      assert not any(h in text for h in hosts), f
