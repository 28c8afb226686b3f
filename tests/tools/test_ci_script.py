""".ci/run, the script CI runs on a fresh clone: it installs as the README says, and a failed step stops it.

Stop 30: the README's install line is an && list, under which ``set -e`` stops nothing but a failure of the
list's last command; torch's install failed (the disk was full), the script went on, and DeepSpeed's install then
pulled the newest CUDA torch and failed with an error that named DeepSpeed.
"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CI_RUN = ROOT / ".ci" / "run"


def top_level_commands(script: str) -> list[str]:
    """The script's unindented command lines (comments, blank lines and continuation lines left out)."""
    return [line for line in script.splitlines() if line and not line[0].isspace() and not line.startswith("#")]


def unguarded_and_lists(script: str) -> list[str]:
    """The top-level && lists that ``set -e`` would let fail silently: those not ending in ``|| exit``."""
    return [
        line
        for line in top_level_commands(script)
        if " && " in line and not re.search(r"\|\|\s*exit\b", line) and not line.rstrip().endswith(("&", "\\", "("))
    ]


def test_the_readme_install_line_runs_in_ci():
    readme = (ROOT / "README.md").read_text()
    install = re.search(r"^(pip install torch\S* && pip install [^\n]*?\"\.\[test\]\")", readme, re.M)
    assert install, "README's install command not found"
    assert install.group(1) in CI_RUN.read_text()


def test_no_step_of_ci_fails_silently():
    assert unguarded_and_lists(CI_RUN.read_text()) == []


def test_the_check_finds_an_unguarded_list():
    script = 'set -e\npip install torch==2.13.0 && pip install -e ".[test]"\n(\n    a && b\n) > log &\n'
    assert unguarded_and_lists(script) == ['pip install torch==2.13.0 && pip install -e ".[test]"']
    assert unguarded_and_lists(script.replace('"\n(', '" || exit 1\n(')) == []


def test_an_unguarded_list_goes_on_under_set_e_and_a_guarded_one_stops():
    """The reason for the guard, shown by bash itself."""
    unguarded = subprocess.run(["bash", "-c", "set -e; false && true; echo went on"], capture_output=True, text=True)
    guarded = subprocess.run(
        ["bash", "-c", "set -e; false && true || exit 1; echo went on"], capture_output=True, text=True
    )
    assert (unguarded.returncode, unguarded.stdout) == (0, "went on\n")
    assert (guarded.returncode, guarded.stdout) == (1, "")


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(CI_RUN)], check=True)
