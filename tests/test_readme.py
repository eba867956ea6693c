"""The README's commands and code stay true."""

import re
import subprocess
import sys
from pathlib import Path

import tomllib
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_first_lines_are_setup_and_main_job_and_tests():
    first = _blocks("bash")[0].strip().splitlines()
    assert first[0].startswith("bash scripts/setup.sh && .venv/bin/normflux demo cylinder")
    assert first[1].startswith("bash scripts/setup.sh && .venv/bin/python -m pytest")
    assert (ROOT / "scripts" / "setup.sh").is_file()
    # the CI script runs the README's test command
    test_cmd = first[1].split("#")[0].strip()
    assert test_cmd in (ROOT / ".ci" / "run").read_text()
    # the entry point the first command calls exists
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["normflux"] == "normflux.cli:main"


def test_setup_pins_cpu_torch_and_pyproject_keeps_a_range():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert 'torch==2.13.0' in setup
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch>=2.2" in deps


def test_python_example_runs():
    """The README's Python example, with 20 steps instead of 1500."""
    code = _blocks("python")[0].replace("range(1500)", "range(20)")
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    x = ns["x"]
    assert x.shape == (1000, 2)


def test_cli_commands_in_readme_are_known_subcommands():
    out = subprocess.run([sys.executable, "-m", "normflux.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in re.findall(r"\.venv/bin/normflux (\w+)", README):
        assert cmd in out, cmd


def test_python_training_example_runs(tmp_path, monkeypatch, recwarn):
    """The README's second Python example (build, standardisation, fit, checkpoint), with 2
    epochs instead of 20, in a temporary directory: no warning, and the checkpoint loads
    back to the same density, in eval mode."""
    monkeypatch.chdir(tmp_path)
    code = _blocks("python")[1].replace("epochs=20", "epochs=2, progress=False")
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    flow, data = ns["flow"], ns["data"]
    assert not flow.training and (tmp_path / "runs" / "moons.pt").exists()
    assert torch.isfinite(flow.log_prob(data[:5])).all()
