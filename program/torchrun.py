"""Living under torchrun's agent: a clean stop that neither looks like a failure nor
ends in the agent's own traceback, and restarts (`--max-restarts`) that resume by
themselves.

On Ctrl-C (or SIGTERM to torchrun) the agent forwards the signal to its workers and,
once they have exited, raises and prints a traceback whatever they did. The run saves
once (every rank stops at the same step), then:

- every worker exits 0 after a clean stop save: an agent on another node that did not
  get the signal sees its workers finish and ends quietly instead of reporting a failure
  or restarting them into a run that is stopping;
- the local rank 0 of a node whose agent was signalled ends that agent (SIGKILL, after
  the save, so nothing of the run is lost) before it can print its traceback; the shell
  may say "Killed".

A worker started again by the agent after a crash (TORCHELASTIC_RESTART_COUNT > 0)
resumes the interrupted run without asking.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def restarted_by_agent() -> bool:
    """True in a worker the agent started again after a failure (`--max-restarts`)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def _agent_pid() -> int | None:
    """The torchrun agent's pid when it is this process's parent."""
    ppid = os.getppid()
    try:
        cmdline = Path(f"/proc/{ppid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    return ppid if ("torch.distributed.run" in cmdline or "torchrun" in cmdline) else None


def stopped(signum: int | None) -> int:
    """The exit code after a clean stop save: 128 + the signal as shells report it, or 0
    under torchrun (see the module docstring), where the local rank 0 that got the signal
    first ends its agent."""
    if not under_torchrun():
        return 143 if signum == signal.SIGTERM else 130
    if signum is not None and os.environ.get("LOCAL_RANK", "0") == "0":
        agent = _agent_pid()
        if agent is not None:
            os.kill(agent, signal.SIGKILL)
    return 0
