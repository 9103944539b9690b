"""How the suite's tests are spread over the two pytest-xdist workers (pytest.ini).

Two rules, applied at collection (``pytest_collection_modifyitems``):

* Tests that share a costly module- or session-scoped fixture (a trained
  job) get one ``xdist_group``, so they run on one worker and the fixture is
  built once per run.
* Work units (a group, or one ungrouped test) that cost seconds are sent
  first, the costliest first, so the two workers end together instead of one
  running a long test alone at the end (longest-processing-time-first). The
  cost of a test is its measured time in ``tests/durations.json`` (setup, call
  and teardown); a unit costs the sum of its tests. Cheap units follow in
  collection order. xdist's own reordering (by number of tests per group) is
  off (``--no-loadscope-reorder`` in pytest.ini), so it sends units in this
  order.

``pytest --write-durations=tests/durations.json`` measures every test of the
run and rewrites the file; tests missing from it count as cheap.
"""

import collections
import json
import os

import pytest

DURATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "durations.json")
# Units costing less than this (seconds) keep their collection order, so a
# module's cheap tests stay together (its fixtures are built once per worker).
COSTLY = 5.0

# Module- and session-scoped fixtures cheap enough (generated files, an
# emulator start, a weights file) to build once on each xdist worker that
# needs them; tests sharing any other such fixture are sent to the same worker.
CHEAP_SHARED_FIXTURES = {"shapes_dir", "binary_dir", "colour_dir", "gcs", "imbalanced_dir",
                         "dockerfile", "folders", "messy", "random_statistics_weights"}


def pytest_addoption(parser):
    parser.addoption("--write-durations", metavar="PATH", default=None,
                     help="write each test's measured seconds (setup + call + teardown) "
                          "to PATH as JSON (tests/scheduling.py reads tests/durations.json)")


@pytest.hookimpl(tryfirst=True)  # Before xdist reads the xdist_group marks.
def pytest_collection_modifyitems(config, items):
    groups = _shared_fixture_groups(items)
    for item in items:
        if item.nodeid in groups:
            item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))
    items[:] = _costliest_first(items, groups, _read_durations(DURATIONS))


def _shared_fixture_groups(items):
    """{nodeid: group name} of the tests sharing a costly module/session fixture."""
    parent = {}

    def find(key):
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    shared = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        for name in (info.names_closure if info else ()):
            defs = info.name2fixturedefs.get(name)
            module = getattr(defs[-1].func, "__module__", "") if defs else ""
            if (not defs or defs[-1].scope not in ("module", "session")
                    or name in CHEAP_SHARED_FIXTURES
                    or not module.startswith(("conftest", "test_"))):  # Ours, not pytest's.
                continue
            key = f"{module}.{name}"
            shared.setdefault(item.nodeid, []).append(key)
            parent[find(key)] = find(shared[item.nodeid][0])
    return {nodeid: find(keys[0]).replace(".", "_") for nodeid, keys in shared.items()}


def _costliest_first(items, groups, durations):
    """``items`` as work units, costly ones first by falling cost, then the rest as collected."""
    units = collections.OrderedDict()
    for item in items:
        units.setdefault(groups.get(item.nodeid, item.nodeid), []).append(item)
    cost = {key: sum(durations.get(item.nodeid, 0.0) for item in unit)
            for key, unit in units.items()}
    costly = sorted((key for key in units if cost[key] >= COSTLY), key=lambda k: -cost[k])
    cheap = [key for key in units if cost[key] < COSTLY]
    return [item for key in costly + cheap for item in units[key]]


def pytest_collection_finish(session):
    """On an xdist worker: fail at once if loadgroup ignored our groups (it did under
    pytest 9 with xdist 3.8), instead of silently building each shared job twice."""
    config = session.config
    if not hasattr(config, "workerinput") or not config.getvalue("loadgroup"):
        return
    lost = [item.nodeid for item in session.items
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        raise pytest.UsageError(
            f"pytest-xdist's loadgroup did not group {len(lost)} tests (first: {lost[0]}); "
            "check the pytest / pytest-xdist versions in setup.py's test extra.")


def _read_durations(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


class DurationRecorder:
    """Sums each test's setup, call and teardown seconds; writes them at the end.

    Registered in the process that receives every report: the only one
    without -n, the xdist controller with it.
    """

    def __init__(self, path):
        self.path = path
        self.seconds = collections.defaultdict(float)

    def pytest_runtest_logreport(self, report):
        nodeid = report.nodeid
        if "@" in nodeid.rsplit("]", 1)[-1]:  # xdist's "@group" suffix.
            nodeid = nodeid.rsplit("@", 1)[0]
        self.seconds[nodeid] += report.duration

    def pytest_sessionfinish(self):
        with open(self.path, "w") as f:
            json.dump({k: round(v, 1) for k, v in sorted(self.seconds.items())}, f, indent=0)
            f.write("\n")


def pytest_configure(config):
    path = config.getoption("--write-durations")
    if path and not hasattr(config, "workerinput"):  # Not on an xdist worker.
        config.pluginmanager.register(DurationRecorder(path), "duration_recorder")
