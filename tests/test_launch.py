"""launch/tpu_vm.sh and launch/gpu_multinode.sh: lint, help, dry runs, bad input, real runs.

Nothing here reaches a cloud or another machine. Dry runs get a PATH whose
gcloud / ssh / sbatch / srun / tar / git fail loudly and leave a marker, so a
dry run that calls one of them fails. The commands a script would send to a
TPU worker or GPU host are executed here with bash, in a temporary home, with
fake `python3.11`, `hostname` and virtual environment: that checks the shell
quoting end to end (an override with a space and a quote arrives as one
argument) and the pin, pid-file and log-file logic.
"""

import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu_vm.sh"
GPU = ROOT / "launch" / "gpu_multinode.sh"
QUICKSTART = ROOT / "launch" / "quickstart.sh"
SHELLCHECK = pathlib.Path(sys.executable).parent / "shellcheck"

CONFIG = "configs/vfal_stage1.py:L"
WORKDIR = "/mnt/gcs/avtok/stage1"
# An override that only survives correct quoting (space, single quote, $).
TRICKY = "--config.data.source=tfds:it's a $HOME"
JAX_PIN = re.search(r"^jax==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)

TRIPWIRES = ("gcloud", "ssh", "scp", "sbatch", "srun", "tar", "git")


def _write_exe(path: pathlib.Path, text: str) -> None:
  path.write_text(text)
  path.chmod(0o755)


@pytest.fixture
def tripwire_env(tmp_path):
  """Environment whose PATH starts with failing gcloud/ssh/sbatch/...; returns (env, marker dir)."""
  bin_dir, marks = tmp_path / "tripwire_bin", tmp_path / "called"
  bin_dir.mkdir()
  marks.mkdir()
  for name in TRIPWIRES:
    _write_exe(
      bin_dir / name,
      f'#!/bin/sh\necho "FAKE {name} CALLED: $*" >&2\ntouch "{marks}/{name}"\nexit 97\n',
    )
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
  return env, marks


def _sh(script, *args, env=None, cwd=None):
  return subprocess.run(
    ["bash", str(script), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60
  )


def _dry(script, *args, tripwire):
  env, marks = tripwire
  proc = _sh(script, *args, "--dry-run", env=env)
  assert proc.returncode == 0, proc.stderr
  assert not list(marks.iterdir()), f"dry run called {[p.name for p in marks.iterdir()]}"
  assert "FAKE" not in proc.stderr + proc.stdout
  return proc.stdout


def _commands(stdout: str) -> list[list[str]]:
  """The '+ ' lines of a dry run, split like a shell would."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _remote(cmd: list[str]) -> str:
  """The shell command a `gcloud ... ssh --command=...` line sends to the workers."""
  (command,) = [a.removeprefix("--command=") for a in cmd if a.startswith("--command=")]
  return command


# ------------------------------------------------------------------- lint, help


@pytest.mark.parametrize("script", [TPU, GPU, QUICKSTART], ids=lambda p: p.name)
def test_shellcheck_clean(script):
  # -x follows `source launch/lib.sh` (paths relative to the repository root) and -a
  # reports its findings too: the shared helpers are checked in the context of both
  # scripts that use them (alone, lib.sh's outputs for the caller look unused).
  proc = subprocess.run(
    [str(SHELLCHECK), "-x", "-a", str(script)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "disable=" not in script.read_text()  # no silenced checks
  assert "disable=" not in (ROOT / "launch" / "lib.sh").read_text()


@pytest.mark.parametrize(
  "script,options",
  [
    (
      TPU,
      "create setup run logs stop delete all hosts --name --zone --project --accelerator "
      "--version --spot --config --workdir --config.KEY=VALUE --repo --branch --remote-dir "
      "--python --worker --dry-run --help",
    ),
    (
      GPU,
      "slurm ssh --config --workdir --config.KEY=VALUE --repo-dir --venv --setup --python "
      "--log-dir --job-name --dry-run --help --nodes --gpus-per-node --partition --time "
      "--sbatch --hosts --port",
    ),
  ],
  ids=["tpu_vm", "gpu_multinode"],
)
def test_help_lists_every_option(script, options, tripwire_env):
  env, marks = tripwire_env
  for flag in ("--help", "-h"):
    proc = _sh(script, flag, env=env)
    assert proc.returncode == 0 and proc.stderr == ""
    missing = [o for o in options.split() if not re.search(rf"(^|\s){re.escape(o)}\b", proc.stdout)]
    assert not missing, missing
  assert not list(marks.iterdir())


# ------------------------------------------------------------------- tpu_vm.sh


@pytest.mark.parametrize(
  "accelerator,hosts,devices,version",
  [
    ("v4-8", 1, 4, "tpu-ubuntu2204-base"),
    ("v4-32", 4, 16, "tpu-ubuntu2204-base"),
    ("v5p-32", 4, 16, "v2-alpha-tpuv5"),
    ("v5litepod-8", 1, 8, "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", 4, 16, "v2-alpha-tpuv5-lite"),
    ("v5e-16", 4, 16, "v2-alpha-tpuv5-lite"),
    ("v6e-64", 16, 64, "v2-alpha-tpuv6e"),
    ("v3-32", 4, 32, "tpu-ubuntu2204-base"),
  ],
)
def test_tpu_hosts_from_accelerator(accelerator, hosts, devices, version, tripwire_env):
  out = _dry(TPU, "hosts", f"--accelerator={accelerator}", tripwire=tripwire_env)
  word = "host" if hosts == 1 else "hosts"
  assert f"{hosts} {word}, {devices} JAX devices" in out and f"runtime {version}" in out


def test_tpu_dry_run_v5litepod_16(tripwire_env):
  out = _dry(
    TPU, "all", "--name=pod", "--zone=us-west4-a", "--project=proj",
    "--accelerator", "v5litepod-16", f"--config={CONFIG}", f"--workdir={WORKDIR}",
    "--config.total_steps=10", TRICKY, tripwire=tripwire_env,
  )  # fmt: skip
  assert "v5litepod-16: 4 hosts, 16 JAX devices" in out
  cmds = _commands(out)
  create = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]]
  assert create == [
    [
      "gcloud", "compute", "tpus", "tpu-vm", "create", "pod", "--zone=us-west4-a",
      "--project=proj", "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite",
    ]
  ]  # fmt: skip
  to_workers = [
    c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and c[4] in ("ssh", "scp")
  ]
  assert len(to_workers) == 4  # scp, unpack, install, run
  assert all("--worker=all" in c and "--zone=us-west4-a" in c for c in to_workers)
  install = _remote(to_workers[2])
  assert "jax[tpu]==$pin" in install and "-r requirements.txt -e ." in install
  (train,) = [
    shlex.split(part.split(">")[0]) for part in _remote(to_workers[3]).split("nohup ")[1:]
  ]
  assert train == [
    ".venv/bin/python", "-m", "avtok_jax.main", f"--config={CONFIG}", f"--workdir={WORKDIR}",
    "--distributed=on", "--config.total_steps=10", TRICKY,
  ]  # fmt: skip


def test_tpu_single_host_runs_without_distributed_flag(tripwire_env):
  out = _dry(
    TPU, "run", "--accelerator=v4-8", f"--config={CONFIG}", "--workdir=w", tripwire=tripwire_env
  )
  assert "v4-8: 1 host, 4 JAX devices" in out
  (cmd,) = _commands(out)
  assert "--worker=all" in cmd and "--distributed" not in _remote(cmd)


def test_tpu_repo_clone_instead_of_copy(tripwire_env):
  out = _dry(
    TPU, "setup", "--repo=https://example.org/avtok.git", "--branch=dev", tripwire=tripwire_env
  )
  cmds = _commands(out)
  assert not any(c[0] == "tar" for c in cmds)
  clone = _remote(cmds[0])
  assert "git clone -q --depth 1 --branch dev https://example.org/avtok.git avtok_jax" in clone


# Fakes for executing worker/host commands here: python3.11 makes a venv whose
# pip logs its arguments and whose python prints its arguments (one a line),
# then sleeps (or exits with $FAKE_EXIT_<process id>).
_FAKE_PYTHON311 = """#!/bin/sh
[ "$1" = -m ] && [ "$2" = venv ] || { echo "unexpected: python3.11 $*" >&2; exit 1; }
mkdir -p "$3/bin"
cp "$FAKE_TEMPLATES/pip" "$FAKE_TEMPLATES/python" "$3/bin/"
"""
_FAKE_PIP = '#!/bin/sh\necho "$*" >> "$FAKE_LOG"\n'
_FAKE_VENV_PYTHON = """#!/bin/bash
[ "$1" = -c ] && { echo "jax fake"; exit 0; }
printf '%s\\n' "$@"
for a in "$@"; do case $a in --process_id=*) id=${a#*=} ;; esac; done
code_var=FAKE_EXIT_${id:-0}
if [ -n "${!code_var:-}" ]; then exit "${!code_var}"; fi
exec sleep "${FAKE_SLEEP:-30}"
"""


@pytest.fixture
def fake_host(tmp_path):
  """A home directory with a code checkout (requirements.txt), fake python3.11 and hostname."""
  home, bin_dir, templates = tmp_path / "home", tmp_path / "fake_bin", tmp_path / "templates"
  for d in (home / "avtok_jax", bin_dir, templates):
    d.mkdir(parents=True)
  (home / "avtok_jax" / "requirements.txt").write_text((ROOT / "requirements.txt").read_text())
  _write_exe(bin_dir / "python3.11", _FAKE_PYTHON311)
  _write_exe(bin_dir / "hostname", '#!/bin/sh\necho "$FAKE_HOST"\n')
  _write_exe(templates / "pip", _FAKE_PIP)
  _write_exe(templates / "python", _FAKE_VENV_PYTHON)
  env = dict(
    os.environ,
    HOME=str(home),
    PATH=f"{bin_dir}:{os.environ['PATH']}",
    FAKE_TEMPLATES=str(templates),
    FAKE_LOG=str(tmp_path / "pip.log"),
  )
  return home, env


def _on_worker(command: str, env, cwd, host: str):
  return subprocess.run(
    ["bash", "-c", command], capture_output=True, text=True, cwd=cwd,
    env=dict(env, FAKE_HOST=host), timeout=30,
  )  # fmt: skip


def _gone(pid: int) -> bool:
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except FileNotFoundError:
    return True
  return state in ("Z", "X")


def test_tpu_worker_commands_install_run_and_stop(fake_host, tripwire_env):
  home, env = fake_host
  args = ("--accelerator=v4-32", f"--config={CONFIG}", f"--workdir={WORKDIR}", TRICKY)
  cmds = _commands(_dry(TPU, "all", *args, tripwire=tripwire_env))
  install, start = _remote(cmds[-2]), _remote(cmds[-1])
  (stop_cmd,) = _commands(_dry(TPU, "stop", tripwire=tripwire_env))
  stop = _remote(stop_cmd)

  proc = _on_worker(install, env, home, "w-0")
  assert proc.returncode == 0, proc.stderr
  assert (
    f"-r requirements.txt -e . jax[tpu]=={JAX_PIN}" in pathlib.Path(env["FAKE_LOG"]).read_text()
  )

  workers = [f"t1v-w-{i}" for i in range(4)]
  pids = []
  try:
    for host in workers:
      proc = _on_worker(start, env, home, host)
      assert proc.returncode == 0 and f"{host}: started pid" in proc.stdout, proc.stderr
      pids.append(int((home / "avtok_jax" / "logs" / f"{host}.pid").read_text()))
    again = _on_worker(start, env, home, workers[0])
    assert again.returncode == 1 and "already runs" in again.stderr
    time.sleep(0.2)  # let the fake trainers print their arguments
    for host in workers:
      log = (home / "avtok_jax" / "logs" / f"{host}.log").read_text().splitlines()
      assert log == [
        "-m", "avtok_jax.main", f"--config={CONFIG}", f"--workdir={WORKDIR}", "--distributed=on", TRICKY
      ]  # fmt: skip
    for host, pid in zip(workers, pids, strict=True):
      proc = _on_worker(stop, env, home, host)
      assert f"{host}: stopped pid {pid}" in proc.stdout, proc.stdout + proc.stderr
    deadline = time.time() + 5
    while not all(_gone(p) for p in pids) and time.time() < deadline:
      time.sleep(0.05)
    assert all(_gone(p) for p in pids)
  finally:
    for pid in pids:
      if not _gone(pid):
        os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------- gpu_multinode.sh


def test_gpu_ssh_dry_run_three_hosts(tripwire_env):
  out = _dry(
    GPU, "ssh", "--hosts=gpu1,alice@gpu2,gpu3", "--port=9000", f"--config={CONFIG}",
    f"--workdir={WORKDIR}", TRICKY, tripwire=tripwire_env,
  )  # fmt: skip
  ssh = [c for c in _commands(out) if c[0] == "ssh"]
  assert [c[:4] for c in ssh] == [["ssh", "-tt", "-o", "BatchMode=yes"]] * 3
  assert [c[4] for c in ssh] == ["gpu1", "alice@gpu2", "gpu3"]
  for i, cmd in enumerate(ssh):
    remote = shlex.split(cmd[5])
    assert remote[:3] == ["cd", str(ROOT), "&&"]
    assert remote[3:] == [
      "exec", str(ROOT / ".venv" / "bin" / "python"), "-m", "avtok_jax.main",
      f"--config={CONFIG}", f"--workdir={WORKDIR}", "--distributed=on",
      "--coordinator_address=gpu1:9000", "--num_processes=3", f"--process_id={i}", TRICKY,
    ]  # fmt: skip
    assert cmd[6:] == ["<", "/dev/null", ">", str(ROOT / "logs" / f"gpu{i + 1}.log"), "2>&1", "&"]


def _sbatch_script(out: str) -> tuple[str, str]:
  match = re.search(r"^\+ cat > (\S+) <<'EOF'\n(.*?)\nEOF$", out, re.M | re.S)
  assert match, out
  return match.group(1), match.group(2)


def test_gpu_slurm_dry_run(tripwire_env, tmp_path):
  out = _dry(
    GPU, "slurm", "--nodes=4", "--gpus-per-node=4", "--time=2:00:00", "--sbatch=--exclusive",
    f"--config={CONFIG}", f"--workdir={WORKDIR}", f"--log-dir={tmp_path}", "--setup", TRICKY,
    tripwire=tripwire_env,
  )  # fmt: skip
  path, script = _sbatch_script(out)
  assert path == str(tmp_path / "avtok.sbatch")
  lines = script.splitlines()
  for line in (
    "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
    "#SBATCH --time=2:00:00", "#SBATCH --exclusive", "export JAX_LOCAL_DEVICE_IDS=0,1,2,3",
  ):  # fmt: skip
    assert line in lines
  (srun,) = [shlex.split(line) for line in lines if line.startswith("srun ")]
  assert srun[srun.index("-m") - 1 :] == [
    str(ROOT / ".venv" / "bin" / "python"), "-m", "avtok_jax.main", f"--config={CONFIG}",
    f"--workdir={WORKDIR}", "--distributed=on", TRICKY,
  ]  # fmt: skip
  assert f"--output={tmp_path}/%x-%j-node%n.log" in srun
  (setup,) = [shlex.split(line) for line in lines if line.startswith("bash -c ")]
  assert f"jax[cuda12]=={JAX_PIN}" in setup[2]
  assert _commands(out)[-1] == ["sbatch", path]


def test_gpu_slurm_writes_and_submits_a_working_script(tripwire_env, tmp_path):
  """Without --dry-run: the script file equals the dry run's, sbatch gets it, and it runs."""
  env, marks = tripwire_env
  args = (
    "slurm",
    "--nodes=2",
    f"--config={CONFIG}",
    f"--workdir={WORKDIR}",
    f"--log-dir={tmp_path}",
  )
  _, expected = _sbatch_script(_dry(GPU, *args, tripwire=tripwire_env))
  proc = _sh(GPU, *args, env=env)
  assert proc.returncode == 97 and (marks / "sbatch").exists()  # the fake sbatch was reached
  script = tmp_path / "avtok.sbatch"
  assert script.read_text() == expected + "\n"
  # Run the batch script with an srun that shows what each task would start.
  fake = tmp_path / "srun_bin"
  fake.mkdir()
  _write_exe(
    fake / "srun", '#!/bin/sh\necho "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"\necho "$@"\n'
  )
  ran = subprocess.run(
    ["bash", str(script)], capture_output=True, text=True, timeout=30,
    env=dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}"),
  )  # fmt: skip
  assert ran.returncode == 0, ran.stderr
  assert ran.stdout.splitlines()[0] == "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"
  assert f"avtok_jax.main --config={CONFIG} --workdir={WORKDIR} --distributed=on" in ran.stdout


@pytest.fixture
def ssh_cluster(tmp_path):
  """A fake `ssh` that runs the remote command here, and a repo dir whose .venv python is fake."""
  repo, bin_dir, logs = tmp_path / "repo", tmp_path / "ssh_bin", tmp_path / "logs"
  (repo / ".venv" / "bin").mkdir(parents=True)
  bin_dir.mkdir()
  _write_exe(repo / ".venv" / "bin" / "python", _FAKE_VENV_PYTHON)
  _write_exe(
    bin_dir / "ssh",
    '#!/bin/bash\nwhile [[ $1 == -* ]]; do [[ $1 == -o ]] && shift; shift; done\nexec bash -c "$2"\n',
  )
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
  args = ("ssh", "--hosts=h0,h1,h2", f"--repo-dir={repo}", f"--log-dir={logs}",
          f"--config={CONFIG}", "--workdir=wd", TRICKY)  # fmt: skip
  return env, args, logs


def test_gpu_ssh_runs_one_process_per_host(ssh_cluster):
  env, args, logs = ssh_cluster
  proc = _sh(GPU, *args, env=dict(env, FAKE_EXIT_0="0", FAKE_EXIT_1="0", FAKE_EXIT_2="0"))
  assert proc.returncode == 0, proc.stderr
  for i in range(3):
    assert (logs / f"h{i}.log").read_text().splitlines() == [
      "-m", "avtok_jax.main", f"--config={CONFIG}", "--workdir=wd", "--distributed=on",
      "--coordinator_address=h0:8476", "--num_processes=3", f"--process_id={i}", TRICKY,
    ]  # fmt: skip


def test_gpu_ssh_failure_stops_the_other_hosts(ssh_cluster):
  env, args, _ = ssh_cluster
  start = time.time()
  proc = _sh(GPU, *args, env=dict(env, FAKE_EXIT_1="3", FAKE_SLEEP="20"))
  assert proc.returncode == 3
  assert "h1 (process 1) exited with status 3" in proc.stderr
  assert time.time() - start < 10  # h0 and h2 (sleeping 20 s) were ended, not waited for


# ------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
  "script,args,named",
  [
    (TPU, ["hosts", "--accelerator=v9-8"], "v9-8"),
    (TPU, ["create", "--accelerator=v4-12"], "v4-12"),
    (TPU, ["create", "--accelerator=v5litepod-12"], "v5litepod-12"),
    (TPU, ["run", "--accelerator=v4-8", "--workdir=w"], "--config"),
    (TPU, ["run", "--accelerator=v4-8", f"--config={CONFIG}", "--workdir=gs://b/w"], "gs://b/w"),
    (TPU, ["run", "--accelerator=v4-8", f"--config={CONFIG}"], "--workdir"),
    (TPU, ["run", f"--config={CONFIG}", "--workdir=w"], "--accelerator"),
    (TPU, ["run", "--accelerator=v4-8", "--config=configs/nope.py:L", "--workdir=w"], "nope.py"),
    (TPU, ["run", "--bogus"], "--bogus"),
    (TPU, ["launch"], "launch"),
    (TPU, [], "no command"),
    (TPU, ["logs", "--worker=first"], "first"),
    (TPU, ["setup", "--branch=dev"], "--repo"),
    (TPU, ["create", "--accelerator"], "--accelerator"),
    (
      TPU,
      ["run", "--accelerator=v4-8", f"--config={CONFIG}", "--workdir=w", "--config.x"],
      "--config.x",
    ),
    (GPU, ["slurm", "--nodes=2", "--workdir=w"], "--config"),
    (GPU, ["ssh", "--hosts=a,b", f"--config={CONFIG}"], "--workdir"),
    (GPU, ["slurm", "--nodes=2", f"--config={CONFIG}", "--workdir=w", "--bogus=1"], "--bogus"),
    (GPU, ["slurm", f"--config={CONFIG}", "--workdir=w"], "--nodes"),
    (GPU, ["slurm", "--nodes=0", f"--config={CONFIG}", "--workdir=w"], "--nodes='0'"),
    (GPU, ["ssh", f"--config={CONFIG}", "--workdir=w"], "--hosts"),
    (GPU, ["ssh", "--hosts=a,b", "--port=70000", f"--config={CONFIG}", "--workdir=w"], "70000"),
    (GPU, ["ssh", "--hosts=a,b;rm", f"--config={CONFIG}", "--workdir=w"], "b;rm"),
    (GPU, ["mpi", f"--config={CONFIG}", "--workdir=w"], "mpi"),
  ],
)
def test_bad_input_one_line_error(script, args, named, tripwire_env):
  env, marks = tripwire_env
  for extra in ([], ["--dry-run"]):
    proc = _sh(script, *args, *extra, env=env)
    assert proc.returncode != 0
    assert len(proc.stderr.splitlines()) == 1 and named in proc.stderr, proc.stderr
    assert proc.stderr.startswith(script.name + ": ")
    assert "+ " not in proc.stdout
  assert not list(marks.iterdir())


def test_tripwires_fire_outside_dry_run(tripwire_env):
  """The fakes are on the scripts' PATH: a real `delete` reaches the fake gcloud."""
  env, marks = tripwire_env
  proc = _sh(TPU, "delete", "--name=x", env=env)
  assert proc.returncode == 97 and (marks / "gcloud").exists()
