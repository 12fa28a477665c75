"""``bench/hub_scale.py`` end to end at a size that runs in seconds: three real replica
processes, real simulated sites; the RESULT line, and ``--keep`` leaving the replicas'
info-level logs for a failed run to be read afterwards."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_small_run_prints_its_result_and_keeps_its_logs(tmp_path: Path) -> None:
    kept = tmp_path / "run"
    command = [sys.executable, str(ROOT / "bench" / "hub_scale.py"), "--sizes", "40"]
    done = subprocess.run(
        [*command, "--measure", "2", "--deployments", "1", "--keep", str(kept)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    result = re.search(r"^RESULT sites=40 hub_cpu_cores=[\d.]+ .*link_errors=0$", output, re.M)
    assert result, output
    logs = [kept / "40" / f"r{n}.log" for n in (1, 2, 3)]
    # At info level a replica says what it became (warning level would say nothing here).
    assert any("leader" in log.read_text() for log in logs), [p.read_text() for p in logs]
    again = subprocess.run(
        [*command, "--keep", str(kept)], capture_output=True, text=True, timeout=60, check=False
    )
    assert again.returncode != 0 and "not empty" in again.stderr + again.stdout
