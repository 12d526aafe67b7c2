"""The suite runs in a shuffled order by default: test files in a random order, and the tests of each file in a
random order, from a seed printed with the results (``--shuffle SEED`` repeats an order, ``--shuffle off`` keeps the
files' order). A test that passes only after another one ran, or only before another one changes something shared,
fails on some seed. Kept apart from conftest.py so that the suite's own test can load it on a planted example."""
import random

import pytest


def pytest_addoption(parser):
    parser.addoption("--shuffle", default="random", metavar="SEED",
                     help="run the test files in a shuffled order, and the tests of each file in a shuffled order, "
                          "from this integer seed; 'random' (default) draws a seed and prints it in the header, "
                          "'off' keeps the files' order")


def shuffle_seed(config) -> int | None:
    """The seed of this run's order (None: files' order). Drawn once per run, then fixed for every hook."""
    if not hasattr(config, "_uniar_shuffle"):
        value = config.getoption("shuffle")
        if value == "off":
            seed = None
        elif value == "random":
            seed = random.SystemRandom().randrange(10**6)
        else:
            try:
                seed = int(value)
            except ValueError:
                raise pytest.UsageError(f"--shuffle: {value!r} is not an integer, 'random' or 'off'")
        config._uniar_shuffle = seed
    return config._uniar_shuffle


def pytest_report_header(config):
    seed = shuffle_seed(config)
    return "test order: files' order (--shuffle off)" if seed is None else \
        f"test order: shuffled, files and the tests in each file; repeat with --shuffle {seed}"


def pytest_terminal_summary(terminalreporter, config):
    seed = shuffle_seed(config)
    if seed is not None:  # also under -q, which hides the header: a failing order can be run again
        terminalreporter.write_line(f"test order: shuffled with --shuffle {seed}")


def pytest_collection_modifyitems(config, items):
    """Shuffle by file: every test passes whatever ran before it, and a file's module-scoped fixtures are still built
    once (the tests of one file stay together)."""
    seed = shuffle_seed(config)
    if seed is None:
        return
    rng, groups = random.Random(seed), {}
    for item in items:
        groups.setdefault(item.nodeid.split("::")[0], []).append(item)
    files = list(groups)
    rng.shuffle(files)
    for f in files:
        rng.shuffle(groups[f])
    items[:] = [item for f in files for item in groups[f]]
