"""Desktop control of a sandbox's VNC session (``debian-vnc``; Tensorlake's ``Desktop``).

``sandbox.connect_desktop()`` exposes the guest's VNC port (5901, display :1) on
127.0.0.1 through the sandbox's port forwarding (the same as ``localsbx expose ID 5901``)
and connects a VNC client to it (vncdotool, which runs Twisted's reactor in a
background thread)::

    with sandbox.connect_desktop() as d:          # password: "tensorlake", the default
        d.click(640, 400)
        d.type_text("hello\\n")
        d.key("ctrl-a")
        Path("screen.png").write_bytes(d.screenshot())

The method names follow the ``tensorlake`` SDK's ``Desktop`` (``screenshot``,
``move_mouse``, ``click``, ``double_click``, ``scroll``, ``press``, ``key_down``,
``key_up``, ``type_text``, ``width``, ``height``, ``close``), with the short aliases
``move`` and ``key``. Key names are vncdotool's (``enter``, ``esc``, ``tab``, ``bsp``,
``ctrl-c``, ``alt-f4``, ``f5``, single characters); ``+`` works as a separator too
(``ctrl+c``).
"""

from __future__ import annotations

import io
import socket
import time
import warnings
from collections.abc import Sequence

from localsbx.errors import DesktopError

__all__ = ["DEFAULT_PASSWORD", "DEFAULT_PORT", "Desktop"]

#: The VNC port of the desktop bases (display :1).
DEFAULT_PORT = 5901
#: The desktop bases' VNC password: Tensorlake's documented default for tensorlake/ubuntu-vnc.
DEFAULT_PASSWORD = "tensorlake"

_BUTTONS = {"left": 1, "middle": 2, "right": 3}
_XK_RETURN, _XK_TAB = 0xFF0D, 0xFF09


def _keysym(ch: str) -> int:
    if ch == "\n":
        return _XK_RETURN
    if ch == "\t":
        return _XK_TAB
    code = ord(ch)
    return code if code < 0x100 else 0x01000000 | code  # X11: Unicode keysyms


def _key_name(key: str) -> str:
    if len(key) > 1 and "+" in key.strip("+"):
        key = key.replace("+", "-")
    return key.lower() if len(key) > 1 else key


class Desktop:
    """A VNC client connected to ``127.0.0.1:host_port`` (see the module docstring).

    :raises DesktopError: nothing answers as a VNC server there within ``connect_timeout``
        seconds, or the password is refused.
    """

    def __init__(self, host_port: int, *, password: str | None = DEFAULT_PASSWORD,
                 connect_timeout: float = 30.0, timeout: float = 60.0) -> None:
        from vncdotool import api

        self.host_port = host_port
        deadline = time.monotonic() + connect_timeout
        # the forward accepts at once; wait until a VNC server greets on it ("RFB 003.008")
        while True:
            try:
                with socket.create_connection(("127.0.0.1", host_port), timeout=5) as s:
                    s.settimeout(max(1.0, deadline - time.monotonic()))
                    if s.recv(12).startswith(b"RFB "):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise DesktopError(f"no VNC server answers on 127.0.0.1:{host_port} "
                                   f"after {connect_timeout:.0f} s",
                                   hint="is the desktop running in the sandbox (a *-vnc base)?")
            time.sleep(0.5)
        # VNC authentication is DES by the protocol (vncdotool warns from its own thread)
        warnings.filterwarnings("ignore", message=".*TripleDES has been moved")
        self._client = api.connect(f"127.0.0.1::{host_port}", password=password,
                                   timeout=timeout)
        try:
            self._client.refreshScreen()
        except Exception as exc:  # noqa: BLE001 - vncdotool/Twisted raise their own classes
            self._close_quietly()
            raise DesktopError(f"VNC connection to 127.0.0.1:{host_port} failed: {exc}",
                               hint="check the password (the desktop bases use "
                                    f"{DEFAULT_PASSWORD!r})") from None
        self._x = self._y = 0

    # ------------------------------------------------------------------ screen

    @property
    def width(self) -> int:
        return int(self._client.protocol.width)

    @property
    def height(self) -> int:
        return int(self._client.protocol.height)

    def screenshot(self, timeout: float = 5.0) -> bytes:
        """The whole screen as PNG bytes (``timeout`` kept for the SDK's signature)."""
        del timeout
        self._client.refreshScreen()
        img = self._client.protocol.screen
        if img is None:
            raise DesktopError("the VNC server sent no screen")
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
        return buf.getvalue()

    # ------------------------------------------------------------------- mouse

    def move_mouse(self, x: int, y: int) -> None:
        self._x, self._y = int(x), int(y)
        self._client.mouseMove(self._x, self._y)

    move = move_mouse

    def _at(self, x: int | None, y: int | None) -> None:
        if x is not None and y is not None:
            self.move_mouse(x, y)

    def mouse_press(self, button: str = "left", x: int | None = None,
                    y: int | None = None) -> None:
        self._at(x, y)
        self._client.mouseDown(self._button(button))

    def mouse_release(self, button: str = "left", x: int | None = None,
                      y: int | None = None) -> None:
        self._at(x, y)
        self._client.mouseUp(self._button(button))

    def click(self, x: int | None = None, y: int | None = None, button: str = "left") -> None:
        self._at(x, y)
        self._client.mousePress(self._button(button))

    def double_click(self, x: int | None = None, y: int | None = None, button: str = "left",
                     delay_ms: int = 50) -> None:
        self.click(x, y, button)
        time.sleep(delay_ms / 1000)
        self.click(None, None, button)

    def left_click(self, x: int | None = None, y: int | None = None) -> None:
        self.click(x, y, "left")

    def right_click(self, x: int | None = None, y: int | None = None) -> None:
        self.click(x, y, "right")

    def middle_click(self, x: int | None = None, y: int | None = None) -> None:
        self.click(x, y, "middle")

    def scroll(self, steps: int, x: int | None = None, y: int | None = None) -> None:
        """Wheel ``steps`` notches: positive up, negative down (buttons 4 and 5)."""
        self._at(x, y)
        button = 4 if steps > 0 else 5
        for _ in range(abs(int(steps))):
            self._client.mousePress(button)

    def scroll_up(self, steps: int = 1, x: int | None = None, y: int | None = None) -> None:
        self.scroll(abs(int(steps)), x, y)

    def scroll_down(self, steps: int = 1, x: int | None = None, y: int | None = None) -> None:
        self.scroll(-abs(int(steps)), x, y)

    @staticmethod
    def _button(name: str | int) -> int:
        if isinstance(name, int):
            return name
        try:
            return _BUTTONS[name]
        except KeyError:
            raise DesktopError(f"unknown mouse button {name!r} (left, middle, right)") from None

    # ---------------------------------------------------------------- keyboard

    def press(self, key: str | Sequence[str]) -> None:
        """Press and release a key or a chord (``"enter"``, ``"ctrl-c"``, ``["ctrl", "c"]``)."""
        name = key if isinstance(key, str) else "-".join(key)
        self._client.keyPress(_key_name(name))

    key = press

    def key_down(self, key: str) -> None:
        self._client.keyDown(_key_name(key))

    def key_up(self, key: str) -> None:
        self._client.keyUp(_key_name(key))

    def type_text(self, text: str) -> None:
        """Type ``text`` character by character (``\\n`` is Return)."""
        for ch in text:
            sym = _keysym(ch)
            self._client.keyEvent(sym, down=True)
            self._client.keyEvent(sym, down=False)

    # ---------------------------------------------------------------- lifetime

    def _close_quietly(self) -> None:
        try:
            self._client.disconnect()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass

    def close(self) -> None:
        self._close_quietly()

    def __enter__(self) -> Desktop:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
