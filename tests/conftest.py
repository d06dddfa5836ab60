"""Shared test set-up: deterministic, CPU-only, quiet."""

import logging
import os

import pytest
import torch

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_loggers():
    """Undo what a test's in-process ``setup_logger`` does to the loggers (handlers on a
    captured, later closed stdout; propagation turned off), so no test sees another's set-up."""
    names = ("acamkd", "detectron2", "fvcore")  # those setup_logger is called for
    loggers = [logging.getLogger(n) for n in names]
    saved = [(log, list(log.handlers), log.propagate) for log in loggers]
    yield
    for log, handlers, propagate in saved:
        log.handlers[:] = handlers
        log.propagate = propagate


@pytest.fixture
def log_records():
    """``log_records(name, level)`` returns a list that receives the messages of logger
    ``name`` until the test ends. The handler sits on that logger itself, so it still hears
    when a ``setup_logger`` in the test turns off propagation to the root, where caplog listens."""
    attached = []

    def attach(name: str, level: int = logging.INFO):
        records = []
        handler = logging.Handler(level)
        handler.emit = lambda record: records.append(record.getMessage())
        log = logging.getLogger(name)
        attached.append((log, handler, log.level))
        log.addHandler(handler)
        if log.getEffectiveLevel() > level:
            log.setLevel(level)
        return records

    yield attach
    for log, handler, level in attached:
        log.removeHandler(handler)
        log.setLevel(level)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (tests of tiny models use it through pytestmark)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
