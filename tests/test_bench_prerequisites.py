"""Each lab benchmark checks what it needs before it starts, and names the command that
installs it (here: run with a PATH where none of the lab's tools is found)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("bench", ["chaos_soak.py", "failover.py", "image_spread.py", "join.py"])
def test_a_lab_benchmark_names_what_is_missing_and_how_to_install_it(
    bench: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / bench)],
        env={"PATH": str(tmp_path), "HOME": str(tmp_path)},  # an empty directory
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert f"bench/{bench} cannot run here" in output
    assert "'wg' is not installed" in output and "'iptables' is not installed" in output
    assert "scripts/setup.sh --lab" in output
    assert "Traceback" not in output
