#!/bin/sh
# debian-vnc (and ubuntu-vnc) customisation, after debian-systemd's: a TigerVNC server on
# :1 (5901, password "tensorlake") with an XFCE session, both systemd units run as root.
set -eu
root=$1

mkdir -p "$root/etc/tigervnc"
chroot "$root" sh -c 'echo tensorlake | tigervncpasswd -f >/etc/tigervnc/passwd'
chmod 0600 "$root/etc/tigervnc/passwd"

cat >"$root/etc/systemd/system/tigervnc-desktop.service" <<'END'
[Unit]
Description=TigerVNC X server on :1 (TCP 5901)
After=network.target

[Service]
# a lock left by a VM that was killed must not stop the server
ExecStartPre=-/bin/rm -f /tmp/.X1-lock /tmp/.X11-unix/X1
ExecStart=/usr/bin/Xtigervnc :1 -geometry 1280x800 -depth 24 -rfbport 5901 -localhost=0 \
    -rfbauth /etc/tigervnc/passwd -SecurityTypes VncAuth -AlwaysShared -desktop desktop \
    -s 0 -nolisten tcp
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
END

cat >"$root/etc/systemd/system/xfce-desktop.service" <<'END'
[Unit]
Description=XFCE session on the VNC display :1
Requires=tigervnc-desktop.service
After=tigervnc-desktop.service dbus.service

[Service]
Environment=DISPLAY=:1 HOME=/root
WorkingDirectory=/root
ExecStartPre=/bin/sh -c 'i=0; until [ -S /tmp/.X11-unix/X1 ]; do i=$((i+1)); [ $i -gt 300 ] && exit 1; sleep 0.2; done'
ExecStart=/usr/bin/dbus-launch --exit-with-session /usr/bin/startxfce4
# started = the desktop is drawn (panel and the full-screen desktop window): systemd is
# "running" only then, so the snapshot, and every sandbox restored from it, has it up
ExecStartPost=/usr/local/libexec/xfce-desktop-ready
TimeoutStartSec=900
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
END
mkdir -p "$root/usr/local/libexec"
cat >"$root/usr/local/libexec/xfce-desktop-ready" <<'END'
#!/bin/sh
# xfce-desktop.service's ExecStartPost: wait until the panel and the full-screen desktop
# window are mapped on :1 (anywhere in the tree: xfwm4 reparents them), then a moment for
# them to be drawn
until xwininfo -root -tree 2>/dev/null | grep -q 'Xfce4-panel")  1280x' &&
    xwininfo -root -tree 2>/dev/null | grep -q 'Xfdesktop")  1280x800'; do
    sleep 1
done
sleep 5
END
chmod 0755 "$root/usr/local/libexec/xfce-desktop-ready"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
for u in tigervnc-desktop.service xfce-desktop.service; do
    ln -sf "/etc/systemd/system/$u" "$root/etc/systemd/system/multi-user.target.wants/$u"
done

# xfwm4's compositor leaves the Xvnc screen black: off (the channel default and xfwm4's own)
mkdir -p "$root/etc/xdg/xfce4/xfconf/xfce-perchannel-xml"
cat >"$root/etc/xdg/xfce4/xfconf/xfce-perchannel-xml/xfwm4.xml" <<'END'
<?xml version="1.0" encoding="UTF-8"?>
<channel name="xfwm4" version="1.0">
  <property name="general" type="empty">
    <property name="use_compositing" type="bool" value="false"/>
  </property>
</channel>
END
[ -f "$root/usr/share/xfwm4/defaults" ] &&
    sed -i 's/^use_compositing=.*/use_compositing=false/' "$root/usr/share/xfwm4/defaults"

# Firefox (ESR from Debian, or Mozilla's): no first-run or telemetry pages over the page asked for
mkdir -p "$root/etc/firefox/policies"
cat >"$root/etc/firefox/policies/policies.json" <<'END'
{"policies": {"OverrideFirstRunPage": "", "OverridePostUpdatePage": "",
  "DisableTelemetry": true, "DontCheckDefaultBrowser": true, "DisableProfileImport": true,
  "UserMessaging": {"WhatsNew": false, "ExtensionRecommendations": false,
    "FeatureRecommendations": false, "UrlbarInterventions": false, "SkipOnboarding": true,
    "MoreFromMozilla": false}}}
END
# no screen locker or power manager prompts in a headless session
mkdir -p "$root/etc/xdg/autostart"
for a in light-locker xfce4-power-manager xscreensaver; do
    printf '[Desktop Entry]\nHidden=true\n' >"$root/etc/xdg/autostart/$a.desktop"
done

# Firefox's first start makes root's profile (minutes of CPU under TCG): do it now, natively,
# headless, so the first window in a sandbox opens sooner
ff=$(chroot "$root" sh -c 'command -v firefox-esr || command -v firefox' || true)
if [ -n "$ff" ]; then
    chroot "$root" env HOME=/root MOZ_DISABLE_CONTENT_SANDBOX=1 timeout 180 \
        "$ff" --headless --screenshot /tmp/localsbx-ff.png about:blank >/dev/null 2>&1 ||
        echo "localsbx: note: the headless first start of $ff failed; the profile is made on first use"
    rm -f "$root/tmp/localsbx-ff.png"
fi
