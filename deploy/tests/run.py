"""Runs deploy/'s script tests (test_*.py here; root, standard library only): one line per test
and `deploy tests: N passed, N failed`. Exit status 1 when any failed.

    python3 deploy/tests/run.py [NAME_FILTER]
"""

import os
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))


class Result(unittest.TextTestResult):
    # Tests (not subtests) with at least one failure or error.
    failed_ids = set()

    def startTest(self, test):
        self._t0 = time.monotonic()
        super().startTest(test)

    def _line(self, word, test):
        print(f"{word} {test.id()} ({time.monotonic() - self._t0:.1f} s)", flush=True)

    def addSuccess(self, test):
        super().addSuccess(test)
        self._line("PASS", test)

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self.failed_ids.add(test.id())
        self._line("FAIL", test)

    def addError(self, test, err):
        super().addError(test, err)
        self.failed_ids.add(test.id())
        self._line("FAIL", test)

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            self.failed_ids.add(test.id())
            self._line("FAIL", subtest)


def main():
    if os.geteuid() != 0:
        print("deploy tests: need root (network namespaces)", file=sys.stderr)
        return 1
    sys.path.insert(0, HERE)
    suite = unittest.defaultTestLoader.discover(HERE, pattern="test_*.py", top_level_dir=HERE)
    if len(sys.argv) > 1:
        want = sys.argv[1]

        def flat(s):
            for t in s:
                yield from flat(t) if isinstance(t, unittest.TestSuite) else [t]

        suite = unittest.TestSuite(t for t in flat(suite) if want in t.id())
    runner = unittest.TextTestRunner(resultclass=Result, verbosity=0, stream=sys.stderr)
    r = runner.run(suite)
    failed = len(Result.failed_ids)
    # Every namespace a test made must be gone.
    mine = f"dpl-{os.getpid()}-"
    left = [n for n in os.listdir("/run/netns") if n.startswith(mine)] if os.path.isdir("/run/netns") else []
    if left:
        failed += 1
        print(f"FAIL namespaces left behind: {', '.join(sorted(left))}")
    skipped = len(r.skipped)
    passed = r.testsRun - failed - skipped
    print(f"deploy tests: {passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    return 1 if failed or r.testsRun == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
