"""The README's first commands are the truth: CI runs the same test command,
and the run command's script (data, then VFAL stages 1 -> 2 -> 3) works end to
end on the built-in data."""

import os
import pathlib
import re
import subprocess
import sys

import av
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ci_test_command() -> str:
  text = (ROOT / ".ci" / "run").read_text()
  match = re.search(r"^TEST_COMMAND='(.+)'$", text, re.MULTILINE)
  assert match, ".ci/run must define TEST_COMMAND='...'"
  return match.group(1)


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  # The first two fenced code blocks of the README hold the two commands.
  blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.DOTALL)
  assert len(blocks) >= 2, "README must start with the run command and the test command"
  assert "launch/quickstart.sh" in blocks[0]
  assert _ci_test_command() in blocks[1], (
    "the README's second command must be .ci/run's TEST_COMMAND"
  )


@pytest.mark.slow
def test_quickstart_end_to_end_on_tiny_preset(tmp_path):
  """The README's run command minus the venv set-up, on the tiny preset."""
  env = dict(
    os.environ,
    SETUP="0",
    SIZE="tiny",
    NUM="8",
    NUM_TEST="4",
    STEPS="2",
    WORKDIR=str(tmp_path),
    PYTHON=sys.executable,
  )
  proc = subprocess.run(
    ["bash", str(ROOT / "launch" / "quickstart.sh")],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  clips = sorted((tmp_path / "clips").glob("*.mp4"))
  assert len(clips) == 16
  with av.open(str(clips[0])) as container:
    assert len(container.streams.video) == 1 and len(container.streams.audio) == 1
  assert list((tmp_path / "tfds").rglob("*.array_record*")), "no array_record files were written"
  for stage in (1, 2, 3):
    samples = tmp_path / f"stage{stage}" / "samples" / "step_0000002"
    assert (samples / "video.png").exists(), proc.stdout[-2000:]
    assert list((tmp_path / f"stage{stage}" / "checkpoints").iterdir())
  assert (tmp_path / "stage3" / "samples" / "step_0000002" / "mel.png").exists()
  assert "Input vs reconstruction" in proc.stdout
