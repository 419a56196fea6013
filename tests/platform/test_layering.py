"""The worker never imports the gateway: what both need (the wire protocol, the cluster token header,
the energy state in Redis) lives in ember/platform/, outside gateway/."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_worker_and_runtime_import_no_gateway_module() -> None:
    code = textwrap.dedent(
        """
        import sys
        import ember.platform.worker.app, ember.platform.worker.node
        import ember.platform.runtime.engine, ember.platform.energy_state, ember.platform.wire
        from ember.platform.worker.node import WorkerNode
        WorkerNode._energy_tick  # the heartbeat's energy publication path imports lazily: import it too
        import ember.platform.energy_state
        leaked = sorted(m for m in sys.modules if m.startswith("ember.platform.gateway"))
        assert not leaked, leaked
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
