"""Prints the differential suite's score (cases agreeing / total) and its times."""


def pytest_terminal_summary(terminalreporter):
    from diff import test_buildkit_diff as t

    if not t.SCORE:
        return
    ok = sum(t.SCORE.values())
    times = ", ".join(f"{k} {v:.0f} s" for k, v in t.TIMES.items())
    terminalreporter.write_line(
        f"BuildKit differential suite: {ok}/{len(t.SCORE)} cases agree with real BuildKit"
        f" ({times})")
    from diff.cases import ORACLE_TOO_OLD

    terminalreporter.write_line(
        f"  not scored ({len(ORACLE_TOO_OLD)}, xfail when they differ): "
        + "; ".join(f"{k}: {v}" for k, v in ORACLE_TOO_OLD.items()))
    bad = sorted(k for k, v in t.SCORE.items() if not v)
    if bad:
        terminalreporter.write_line("  differ: " + " ".join(bad))
