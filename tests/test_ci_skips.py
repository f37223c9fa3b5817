"""Under CI=true a skip fails the run unless it is for want of ../shared."""

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def run_with_ci(tmp_path, reason: str, ci: str = "true") -> subprocess.CompletedProcess:
    test = tmp_path / "test_skipping.py"
    test.write_text(f"import pytest\n\ndef test_a():\n    pytest.skip({reason!r})\n\ndef test_b():\n    pass\n")
    env = {**os.environ, "CI": ci}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "tests.ci_skips", "-p", "no:cacheprovider",
                           str(test)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_a_skip_for_a_missing_tool_fails_under_ci(tmp_path):
    result = run_with_ci(tmp_path, "shellcheck is not installed")
    assert result.returncode == 1, result.stdout
    assert "CI=true forbids this skip" in result.stdout and "shellcheck is not installed" in result.stdout


def test_a_skip_for_missing_shared_data_passes_under_ci_and_any_skip_passes_elsewhere(tmp_path):
    assert run_with_ci(tmp_path, "../shared/data/landmarks-dev is not present").returncode == 0
    assert run_with_ci(tmp_path, "shellcheck is not installed", ci="").returncode == 0
