"""The fault table: one row per fault that tests/test_faults.py caused, printed at the end.

A test adds its rows with the ``fault_row`` fixture; each row travels on the
test's report (``user_properties``), so under pytest-xdist the fault tests can
run on either worker and the controller still gathers every row. The table
is printed in the terminal summary, rows in collection order, and written to
the file named by ``$FAULTS_TABLE`` when set (docs/faults.md holds a real
run's).
"""

import os

import pytest

_KEY = "fault_row"
_HEADER = ["| Fault | What happened | Steps redone | Time to resume (s) |",
           "|---|---|---|---|"]


@pytest.fixture
def fault_row(request):
    """record(fault, outcome, steps redone or None, seconds to resume or None)."""
    index = request.session.items.index(request.node)

    def record(fault, outcome, redone, seconds):
        request.node.user_properties.append((_KEY, (index, fault, outcome, redone, seconds)))
    return record


class _Collector:
    def __init__(self):
        self.rows = []

    def pytest_runtest_logreport(self, report):
        if report.when == "teardown":  # Its report carries all the test's properties.
            self.rows += [value for key, value in report.user_properties if key == _KEY]

    def table(self):
        rows = sorted(self.rows, key=lambda row: row[0])  # Stable: a test's rows in order.
        return "\n".join(_HEADER + [
            f"| {f} | {o} | {'–' if r is None else r} | {'–' if s is None else f'{s:.1f}'} |"
            for _, f, o, r, s in rows])

    def pytest_terminal_summary(self, terminalreporter):
        if not self.rows:
            return
        table = self.table()
        terminalreporter.write_sep("-", "fault table (tests/test_faults.py)")
        terminalreporter.write_line(table)
        if os.environ.get("FAULTS_TABLE"):
            with open(os.environ["FAULTS_TABLE"], "w") as f:
                f.write(table + "\n")


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # The process that receives every report.
        config.pluginmanager.register(_Collector(), "fault_table_collector")
