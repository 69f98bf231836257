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
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
END
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
for u in tigervnc-desktop.service xfce-desktop.service; do
    ln -sf "/etc/systemd/system/$u" "$root/etc/systemd/system/multi-user.target.wants/$u"
done

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
