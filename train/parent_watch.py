"""Workers that die with their launcher.

torchrun starts each worker in a session of its own (`start_new_session=True`), so killing the launcher, or its
process group, leaves the ranks training and saving into the output directory. torchrun's agent stops the other
workers when one fails (its own mechanism for the loss of a peer), but nothing stops them when the agent itself
dies, and torch offers no such option. Linux can: prctl(PR_SET_PDEATHSIG) asks the kernel to send a signal
to this process when its parent exits.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send `sig` to this process when its parent exits; False where unsupported (non-Linux).

    Call it as early as possible: a parent that dies before the call is noticed only if it dies during it
    (then this exits). Idempotent."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    parent = os.getppid()
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # re-parented while we asked: the signal will not come
        raise SystemExit(f"pid {os.getpid()}: the launcher (pid {parent}) exited; stopping")
    return True
