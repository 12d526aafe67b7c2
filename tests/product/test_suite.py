"""The suite's own order: it runs shuffled by default (tests/shuffle.py), so a test that depends on what ran before it
fails on some seed instead of hiding behind the files' order. Checked on a planted order dependency and on the
suite's own collection."""
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]  # tests/


def planted(pytester):
    """Two files, each passing only if another test ran first: across files (a file written by test_a) and within a
    file (a module global set by the first test)."""
    pytester.makepyfile(
        test_a="from pathlib import Path\ndef test_writes(): Path('mark').write_text('x')\n",
        test_b="from pathlib import Path\nseen = []\n"
               "def test_first(): seen.append(1)\n"
               "def test_second(): assert seen and Path('mark').exists()\n")


def run(pytester, *args):
    (pytester.path / "mark").unlink(missing_ok=True)
    return pytester.runpytest("-p", "shuffle", "-p", "no:cacheprovider", *map(str, args))


def order(pytester, *args) -> list[str]:
    return [line for line in run(pytester, "--collect-only", "-q", *args).outlines if "::" in line]


def test_shuffled_order_exposes_a_hidden_dependency_and_names_its_seed(pytester):
    planted(pytester)
    assert run(pytester, "--shuffle", "off").ret == 0  # the files' order hides it
    failed = []
    for seed in range(6):
        r = run(pytester, "--shuffle", seed)
        assert f"test order: shuffled with --shuffle {seed}" in r.outlines
        if r.ret != 0:
            failed.append(seed)
    assert failed and len(failed) < 6, failed  # some orders fail, and not every order


def test_one_seed_one_order_and_each_file_stays_together(pytester):
    planted(pytester)
    files_order = order(pytester, "--shuffle", "off")
    orders = {seed: order(pytester, "--shuffle", seed) for seed in range(4)}
    assert order(pytester, "--shuffle", 3) == orders[3]
    assert len({tuple(o) for o in orders.values()}) > 1
    for o in orders.values():
        assert sorted(o) == sorted(files_order)
        files = [t.split("::")[0] for t in o]
        assert files == sorted(files, key=files.index)  # contiguous: module fixtures are built once per file
    bad = run(pytester, "--shuffle", "soon")
    assert bad.ret != 0 and "--shuffle: 'soon' is not an integer, 'random' or 'off'" in "\n".join(bad.errlines)


def test_the_suite_itself_runs_shuffled():
    """The README's test command (no flag) shuffles this suite: two collections differ and hold the same tests."""
    runs = [subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                            *map(str, (TESTS / "training" / "test_toy.py", TESTS / "product" / "test_suite.py"))],
                           cwd=TESTS.parent, env=dict(os.environ), capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    orders = [[line for line in r.stdout.splitlines() if "::" in line] for r in runs]
    assert orders[0] and sorted(orders[0]) == sorted(orders[1])
    seeds = [line for r in runs for line in r.stdout.splitlines() if line.startswith("test order: shuffled")]
    assert len(seeds) == 2
    assert orders[0] != orders[1] or seeds[0] == seeds[1]
