"""A pytest plugin: under CI=true every test runs except those that need ../shared (a clone without it
skips them). .ci/run installs shellcheck, the GCS emulator and skimage, so another skip means a
broken setup, and it fails the run (each one named in the summary)."""

import os

ALLOWED_CI_SKIPS = ("../shared",)
_disallowed: list[str] = []


def pytest_runtest_logreport(report):
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(allowed in reason for allowed in ALLOWED_CI_SKIPS):
            _disallowed.append(f"{report.nodeid}: {reason}")


def pytest_terminal_summary(terminalreporter):
    for line in _disallowed:
        terminalreporter.write_line(f"CI=true forbids this skip: {line}", red=True)


def pytest_sessionfinish(session, exitstatus):
    if _disallowed and exitstatus == 0:
        session.exitstatus = 1
