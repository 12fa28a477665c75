"""A second agent on a live agent's data dir refuses to start (meshorch.dirlock), touching
nothing there; once the first is killed with SIGKILL, a new one starts on the directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp

from meshorch.demo.localsite import LocalHost, LocalSite, free_port, get_status, wait_ready
from meshorch.dirlock import LOCK_FILE


def second_agent(site: LocalSite, host: LocalHost) -> subprocess.CompletedProcess[str]:
    """The same command as the host's, on its data dir, with ports of its own."""
    command = [
        sys.executable, "-m", "meshorch", "agent", "--site", site.site,
        "--host-id", host.host_id, "--data-dir", str(host.data_dir),
        "--api", f"127.0.0.1:{free_port()}", "--raft", f"127.0.0.1:{free_port()}",
        "--cluster-password-file", str(site.password_file), "--preset", "local",
        "--runtime", site.runtime, "--operator-token-file", str(site.token_file),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def untouched(data_dir: Path) -> dict[str, tuple[int, int]]:
    """What a second agent would write at once: its identity, password, socket and lock."""
    names = ["agent.json", "cluster.password", "agent.sock", LOCK_FILE]
    return {name: (s.st_ino, s.st_mtime_ns) for name in names for s in [(data_dir / name).stat()]}


async def test_a_second_agent_on_the_data_dir_is_refused_until_the_first_dies(
    tmp_path: Path,
) -> None:
    site = LocalSite(hosts=1, site="lock", root=tmp_path)
    host = site.members[0]
    site.start()
    try:
        async with site.session(timeout=aiohttp.ClientTimeout(total=20)) as session:
            await wait_ready(session, [host])
            assert host.process is not None
            first_pid = host.process.pid
            before = untouched(host.data_dir)
            lock_record = (host.data_dir / LOCK_FILE).read_text()
            assert lock_record == f"{first_pid} meshorch agent\n"

            second = second_agent(site, host)

            assert second.returncode != 0, second.stderr
            message = second.stderr
            assert f"data dir {host.data_dir} is in use" in message
            assert f"meshorch agent, pid {first_pid}" in message
            assert "stop that process first, or give this one another --data-dir" in message
            assert "Traceback" not in message
            assert untouched(host.data_dir) == before
            assert (host.data_dir / LOCK_FILE).read_text() == lock_record
            # the first serves on
            assert host.process.poll() is None
            status = await get_status(session, host)
            assert status is not None and status["ready"], status

            site.kill(host)  # SIGKILL: the kernel drops the lock with the process
            site.start_host(host)
            await wait_ready(session, [host])
            assert host.process.pid != first_pid
            assert (host.data_dir / LOCK_FILE).read_text() == (
                f"{host.process.pid} meshorch agent\n"
            )
    finally:
        site.stop()
        print(site.logs())
