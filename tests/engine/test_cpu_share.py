"""The thread governor: one thread fewer while another process keeps a core busy, and back after."""

import subprocess
import sys

import pytest
import torch

from ember.engine import cpu_share
from ember.engine.cpu_share import ThreadGovernor, run_queue_wait_s


class FakeMachine:
    """A clock and a run-queue wait counter the test drives: `waiting` threads' worth of wait per second."""

    def __init__(self):
        self.now, self.wait, self.waiting = 0.0, 0.0, 0.0

    def advance(self, seconds, governor, steps=10):
        for _ in range(steps):
            governor.before_step()
            self.now += seconds / steps
            self.wait += self.waiting * seconds / steps
            governor.after_step()


@pytest.fixture
def machine():
    before = torch.get_num_threads()
    yield FakeMachine()
    torch.set_num_threads(before)


def test_steps_down_under_contention_probes_back_and_backs_off(machine):
    gov = ThreadGovernor(2, clock=lambda: machine.now, wait_reader=lambda: machine.wait)
    machine.advance(3, gov)
    assert gov.threads == 2 and torch.get_num_threads() == 2  # quiet: nothing changes

    machine.waiting = 0.9  # a competitor: one of our threads waits most of the time
    machine.advance(0.6, gov)
    assert gov.threads == 1 and torch.get_num_threads() == 1

    machine.waiting = 0.0  # alone on a core now; the first probe comes after FIRST_PROBE_S
    machine.advance(cpu_share.FIRST_PROBE_S - 1, gov)
    assert gov.threads == 1
    machine.advance(1.5, gov)
    assert gov.threads == 2 and gov.probing

    machine.waiting = 0.9  # the competitor is still there: back down, and wait twice as long
    machine.advance(0.6, gov)
    assert gov.threads == 1 and gov.probe_after == 2 * cpu_share.FIRST_PROBE_S
    machine.waiting = 0.0
    machine.advance(2 * cpu_share.FIRST_PROBE_S - 1, gov)
    assert gov.threads == 1
    machine.advance(1.5, gov)
    assert gov.threads == 2  # probing again

    machine.advance(1.0, gov)  # the competitor left: the probe holds
    assert gov.threads == 2 and not gov.probing and gov.probe_after == cpu_share.FIRST_PROBE_S


def test_an_idle_gap_is_not_read_as_a_quiet_machine(machine):
    gov = ThreadGovernor(2, clock=lambda: machine.now, wait_reader=lambda: machine.wait)
    machine.waiting = 0.9
    machine.advance(0.6, gov)
    assert gov.threads == 1
    machine.waiting = 0.0
    machine.advance(cpu_share.FIRST_PROBE_S + 0.3, gov)
    assert gov.threads == 2 and gov.probing
    machine.waiting = 0.9
    machine.now += 30  # no steps for a while (waiting nothing); then contention again
    machine.advance(0.2, gov, steps=1)
    assert gov.probing  # the pause was not counted as a quiet window
    machine.advance(0.6, gov)
    assert gov.threads == 1


def test_long_steps_are_still_judged(machine):
    """A big model's steps can take seconds each: every step still closes a window."""
    gov = ThreadGovernor(2, clock=lambda: machine.now, wait_reader=lambda: machine.wait)
    machine.waiting = 0.9
    machine.advance(6, gov, steps=2)
    assert gov.threads == 1


def test_one_thread_or_no_schedstat_means_no_governing(machine):
    assert not ThreadGovernor(1, clock=lambda: machine.now, wait_reader=lambda: machine.wait).enabled
    assert not ThreadGovernor(2, clock=lambda: machine.now, wait_reader=lambda: None).enabled


@pytest.mark.skipif(run_queue_wait_s() is None, reason="this kernel does not report run-queue wait (schedstat)")
def test_run_queue_wait_is_read_from_this_process_threads():
    """The reading the governor trusts: more wait while more busy threads than cores share the CPU."""
    import os

    cores = len(os.sched_getaffinity(0))
    before = run_queue_wait_s()
    spinners = [subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                                  "while time.process_time() - t < 1.0: pass"]) for _ in range(cores + 1)]
    t = __import__("time").process_time()
    while __import__("time").process_time() - t < 1.0:  # this process competes too, for one CPU second
        pass
    for p in spinners:
        p.wait()
    assert run_queue_wait_s() > before  # it waited for a core at some point
