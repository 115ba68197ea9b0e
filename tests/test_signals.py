"""Stop requests in one process: SIGTERM, SIGUSR1 and a first Ctrl-C only ask for a stop at the step's end;
Ctrl-C delivered twice at once (by the terminal and by torchrun) is one; a second press stops at once.
(With real processes and checkpoints: tests/test_faults.py.)"""

from __future__ import annotations

import os
import signal
import time

import pytest

from sd3.dist.runtime import StopSignal


@pytest.fixture
def stop(monkeypatch):
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    monkeypatch.setattr(StopSignal, "AGAIN_S", 0.2)
    try:
        yield StopSignal()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_signal_asks_for_a_stop_and_the_first_names_it(stop):
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested and stop.received == "SIGUSR1"


def test_ctrl_c_asks_for_a_stop_says_so_and_a_second_press_stops_at_once(stop, capfd):
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)          # the same Ctrl-C, from torchrun too: no second press
    assert stop.received == "SIGINT"
    assert capfd.readouterr().err.count("Ctrl-C: stopping after this step with a checkpoint") == 1
    time.sleep(0.25)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)                            # the handler runs at the next bytecode


def test_only_the_announcing_rank_says_it(stop, capfd):
    stop.announce = False
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested and capfd.readouterr().err == ""
