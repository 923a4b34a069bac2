"""Who may use the sockets (SPEC §3, §11): the submit socket is 0660 to a group, the control
socket 0600, and `daemon.allowed_uids` narrows the submit socket to named peers (by
SO_PEERCRED, the kernel's word). Clients of another uid are real processes here."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from .conftest import Daemon, write_config

NOBODY = 65534
CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect_error": exc.errno})); sys.exit(0)
try:
    s.sendall(b'{"op": "ping"}\\n')
except BrokenPipeError:
    pass  # a refused peer may be answered and closed before it writes; the answer is still readable
print(s.makefile("rb").readline().decode().strip())
"""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")


def as_nobody(path: str) -> dict[str, Any]:
    # the system's python: the project's venv may sit where nobody can read it
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    out = subprocess.run([python, "-c", CLIENT, path], capture_output=True, timeout=20,
                         user=NOBODY, group=NOBODY, extra_groups=[NOBODY])
    assert out.stdout, out.stderr
    answer: dict[str, Any] = json.loads(out.stdout)
    return answer


async def test_socket_modes_group_and_allowed_uids(tmp_path: Path) -> None:
    sockets = Path(tempfile.mkdtemp(prefix="mta-access-"))
    sockets.chmod(0o755)  # others may reach the socket files; their modes decide the rest
    results = {}
    for allowed in ([4242], [NOBODY]):
        cfg = write_config(tmp_path, extra="")
        text = cfg.read_text().replace(f'submit_socket = "{tmp_path}/submit.sock"',
                                       f'submit_socket = "{sockets}/submit.sock"\nsubmit_group = "nogroup"\n'
                                       f"allowed_uids = {allowed}")
        text = text.replace(f'control_socket = "{tmp_path}/control.sock"', f'control_socket = "{sockets}/control.sock"')
        cfg.write_text(text)
        d = Daemon(cfg)
        app = await d.start()
        try:
            submit, control = os.stat(sockets / "submit.sock"), os.stat(sockets / "control.sock")
            assert stat.S_IMODE(submit.st_mode) == 0o660 and submit.st_gid == NOBODY
            assert stat.S_IMODE(control.st_mode) == 0o600
            assert app.config.not_yet_in_effect == ()
            # in a thread: the daemon answering it runs in this test's event loop
            results[allowed[0]] = (await asyncio.to_thread(as_nobody, str(sockets / "submit.sock")),
                                   await asyncio.to_thread(as_nobody, str(sockets / "control.sock")))
        finally:
            await d.stop()
    shutil.rmtree(sockets, ignore_errors=True)
    refused, control_refused = results[4242]
    assert refused["error"]["code"] == "forbidden"
    assert control_refused == {"connect_error": 13}  # EACCES: 0600 and not ours
    allowed, _ = results[NOBODY]
    assert allowed == {"ok": True}
