"""Issue 10 items 7, 8 at the step level (no VM): a guest that goes away during a RUN is
an ImageBuildError naming the step and line, with the step's output so far."""

from __future__ import annotations

import pytest
from test_builder_ops import FakeGuest, build

from localsbx.errors import GuestError, ImageBuildError


class DyingGuest(FakeGuest):
    async def exec(self, argv, *, stdout_cb=None, kill_tree=False, **kw):
        if kill_tree:  # the RUN step: some output, then the VM is gone
            stdout_cb(b"partial-output\n")
            raise GuestError("the guest closed the command's channel without an exit status")
        return await super().exec(argv, stdout_cb=stdout_cb, kill_tree=kill_tree, **kw)


async def test_a_guest_that_dies_in_a_run_names_step_line_and_output():
    with pytest.raises(ImageBuildError) as ei:
        await build("RUN true\nENV A=1\n", guest=DyingGuest())
    exc = ei.value
    assert exc.step.startswith("line 2: RUN") and "/src/Dockerfile, line 2" in exc.message
    assert "partial-output" in exc.output_tail
    assert "stopped or the connection" in exc.message and "kill -9 -1" in exc.hint
