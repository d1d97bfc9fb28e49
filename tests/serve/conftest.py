"""Fixtures for the serving tests: one small runtime (tiny random Llama target, noisy-copy drafter, chain of 3) and
a scheduler over it; servers only on 127.0.0.1."""
from __future__ import annotations

import pytest

import main
from runtime.device import host
from runtime.load import load
from spec_compiler.plan import make_plan
from spec_compiler.validate import validate
from tests.conftest import compose_config

SMALL = ["task=serve", "tree.k=3", "target.max_seq_len=96", "target.model.hidden_size=32", "target.model.num_layers=2",
         "target.model.intermediate_size=64"]
BATCH = 4


def serve_spec(overrides: list[str] = ()):
    return main.to_spec(compose_config(SMALL + list(overrides)))


def plan_of(spec):
    return make_plan(validate(spec, host()))


@pytest.fixture(scope="module")
def spec():
    return serve_spec()


@pytest.fixture(scope="module")
def runtime(spec):
    return load(plan_of(spec), BATCH)


@pytest.fixture(scope="module")
def alone(spec):
    """The same plan with one cache row: the single-request reference."""
    return load(plan_of(spec), 1)


def make_scheduler(rt, spec, **serving):
    """A scheduler over `rt` with the spec's serving config (rows = rt's unless given, other fields overridden)."""
    import dataclasses

    from serve.scheduler import Scheduler
    return Scheduler(rt, dataclasses.replace(spec.serving, **{"max_batch_size": rt.batch_size, **serving}))


@pytest.fixture(autouse=True)
def quiet_logging():
    """The HTTP clients log every request at INFO, and an in-process main.cli (here or in an earlier test of the
    same worker) leaves Hydra's logging set up: root at INFO with a file handler into a run folder that may be
    gone by now. Keep the clients at WARNING, and put back the root logger after each test."""
    import logging
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    clients = {name: logging.getLogger(name) for name in ("httpx", "httpx2", "openai")}
    levels = {name: lg.level for name, lg in clients.items()}
    for lg in clients.values():
        lg.setLevel(logging.WARNING)
    yield
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
    for name, lg in clients.items():
        lg.setLevel(levels[name])
