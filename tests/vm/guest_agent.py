"""The test guest's main program: runs Python snippets the host sends, one at a time.

Copied by the harness into the VM's 9p "work" share as ``main.py``; the guest's init runs
it after mounting the root, and powers the guest off when it returns. Talking over its own
virtio-serial port (``org.qpid.test.ctl``) lets one boot serve several tests, which keeps
the suite's TCG boot count (about 5 s each) low.

Protocol, one JSON object per line each way:
  guest -> host  {"boot": uptime}   at once, before importing anything big (first byte)
  guest -> host  {"ready": true, "uptime": s, "import_proton": s, "proton": [0, 37, 0]}
  host -> guest  {"id": n, "code": "...", "params": {...}}   or  {"id": n, "exit": true}
  guest -> host  {"id": n, "ok": true, "result": ..., "seconds": s}
                 {"id": n, "ok": false, "error": "traceback"}
The snippet sees ``params`` as globals and sets ``result`` (JSON-serialisable).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import traceback


def uptime() -> float:
    """Seconds since the guest kernel booted (so the host can relate guest timings)."""
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def main() -> None:
    """Open the control port, announce readiness, then serve commands until told to exit."""
    # port.py alone (stdlib only): importing the connector.guest package would import
    # proton first, and the first byte is meant to be timed without it.
    spec = importlib.util.spec_from_file_location("qvc_port", "/qvc/connector/guest/port.py")
    assert spec is not None and spec.loader is not None
    port = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(port)
    fd = os.open(port.find_port("org.qpid.test.ctl"), os.O_RDWR | os.O_NOCTTY)
    ctl = os.fdopen(fd, "r+b", buffering=0)
    ctl.write(json.dumps({"boot": uptime()}).encode() + b"\n")
    t0 = time.monotonic()
    import proton

    import_seconds = time.monotonic() - t0
    hello = {
        "ready": True,
        "uptime": uptime(),
        "import_proton": import_seconds,
        "proton": list(proton.VERSION),
    }
    ctl.write(json.dumps(hello).encode() + b"\n")
    buf = b""
    while True:
        chunk = ctl.read(65536)
        if not chunk:
            time.sleep(0.05)  # host side not connected: the port reads EOF until it is
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if not line.strip():
                continue
            cmd = json.loads(line)
            if cmd.get("exit"):
                ctl.write(json.dumps({"id": cmd["id"], "ok": True}).encode() + b"\n")
                return
            ctl.write(json.dumps(run(cmd)).encode() + b"\n")


def run(cmd: dict) -> dict:
    """Execute one snippet and report its ``result`` or its traceback."""
    scope = dict(cmd.get("params") or {})
    scope["result"] = None
    start = time.monotonic()
    try:
        exec(compile(cmd["code"], f"<snippet {cmd['id']}>", "exec"), scope)
        return {
            "id": cmd["id"],
            "ok": True,
            "result": scope["result"],
            "seconds": time.monotonic() - start,
        }
    except BaseException:
        return {
            "id": cmd["id"],
            "ok": False,
            "error": traceback.format_exc(),
            "seconds": time.monotonic() - start,
        }


if __name__ == "__main__":
    main()
