"""The polkit rule for privileged commands, evaluated by the real polkitd.

polkitd runs on a private D-Bus system bus inside a private mount namespace, where the rule directory and
a passwd file with the mqtt-agent user are bind-mounted: nothing on this machine is changed. pkcheck then
asks, for processes running as mqtt-agent and as another user, exactly what `systemctl restart X` and
`systemctl reboot` ask systemd/logind to check.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parents[2] / "deploy" / "polkit" / "50-mqtt-agent.rules"
POLKITD = Path("/usr/lib/polkit-1/polkitd")
MANAGE_UNITS = "org.freedesktop.systemd1.manage-units"

BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:abstract={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

# Runs inside `unshare --mount`: the bind mounts vanish with the namespace.
HARNESS = r"""
set -u
W=$1; AGENT_UID=$2; OTHER_UID=$3
mount --bind "$W/passwd" /etc/passwd
mount --bind "$W/group" /etc/group
mount --bind "$W/rules.d" /etc/polkit-1/rules.d
dbus-daemon --config-file="$W/bus.conf" --nofork --nopidfile --print-address=3 3>"$W/address" 2>/dev/null &
BUS=$!
i=0; while [ ! -s "$W/address" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
DBUS_SYSTEM_BUS_ADDRESS="$(head -n1 "$W/address")"; export DBUS_SYSTEM_BUS_ADDRESS
/usr/lib/polkit-1/polkitd --no-debug >"$W/polkitd.log" 2>&1 &
PK=$!
i=0
until dbus-send --system --print-reply --dest=org.freedesktop.DBus /org/freedesktop/DBus \
      org.freedesktop.DBus.NameHasOwner string:org.freedesktop.PolicyKit1 2>/dev/null | grep -q "boolean true"; do
  i=$((i+1)); [ $i -gt 150 ] && { echo "polkitd did not start"; cat "$W/polkitd.log"; kill $PK $BUS; exit 3; }
  sleep 0.1
done
setpriv --reuid="$AGENT_UID" --regid="$AGENT_UID" --clear-groups sleep 120 & AGENT=$!
setpriv --reuid="$OTHER_UID" --regid="$OTHER_UID" --clear-groups sleep 120 & OTHER=$!
sleep 0.3
while read -r name who action unit verb; do
  pid=$AGENT; [ "$who" = other ] && pid=$OTHER
  if [ "$unit" = - ]; then
    pkcheck --action-id "$action" --process "$pid" >/dev/null 2>&1
  else
    pkcheck --action-id "$action" --process "$pid" --detail unit "$unit" --detail verb "$verb" >/dev/null 2>&1
  fi
  echo "$name $?"
done < "$W/cases"
kill $AGENT $OTHER $PK $BUS 2>/dev/null
wait 2>/dev/null
exit 0
"""

CASES = {
    # name: (who, action, unit, verb, allowed by the shipped rule)
    "restart-nodered": ("agent", MANAGE_UNITS, "nodered.service", "restart", True),
    "start-mosquitto": ("agent", MANAGE_UNITS, "mosquitto.service", "start", True),
    "reboot": ("agent", "org.freedesktop.login1.reboot", "-", "-", True),
    "reboot-with-others-logged-in": ("agent", "org.freedesktop.login1.reboot-multiple-sessions", "-", "-", True),
    "restart-sshd": ("agent", MANAGE_UNITS, "ssh.service", "restart", False),
    "restart-own-unit": ("agent", MANAGE_UNITS, "mqtt-agent.service", "restart", False),
    "mask-nodered": ("agent", MANAGE_UNITS, "nodered.service", "mask", False),
    "unit-prefix-trick": ("agent", MANAGE_UNITS, "nodered.service.d", "restart", False),
    "power-off": ("agent", "org.freedesktop.login1.power-off", "-", "-", False),
    "reboot-ignoring-inhibitors": ("agent", "org.freedesktop.login1.reboot-ignore-inhibit", "-", "-", False),
    "set-hostname": ("agent", "org.freedesktop.hostname1.set-static-hostname", "-", "-", False),
    "other-user-restart-nodered": ("other", MANAGE_UNITS, "nodered.service", "restart", False),
    "other-user-reboot": ("other", "org.freedesktop.login1.reboot", "-", "-", False),
}


def _free_ids(count: int) -> list[int]:
    taken = {p.pw_uid for p in pwd.getpwall()}
    found = [uid for uid in range(64990, 60000, -1) if uid not in taken]
    return found[:count]


def run_polkit(tmp_path: Path, rules: Path | None) -> dict[str, bool]:
    for tool in ("unshare", "setpriv", "dbus-daemon", "dbus-send", "pkcheck"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; run ./scripts/test.sh, which installs it")
    if not POLKITD.exists():
        pytest.fail("polkitd is not installed; run ./scripts/test.sh, which installs it (Debian: polkitd)")
    work = tmp_path / "polkit"
    (work / "rules.d").mkdir(parents=True)
    if rules is not None:
        shutil.copy(rules, work / "rules.d" / rules.name)
    agent_uid, other_uid = _free_ids(2)
    passwd = Path("/etc/passwd").read_text()
    group = Path("/etc/group").read_text()
    if "\nmqtt-agent:" not in "\n" + passwd:
        passwd += f"mqtt-agent:x:{agent_uid}:{agent_uid}:mqtt-agent:/nonexistent:/usr/sbin/nologin\n"
        group += f"mqtt-agent:x:{agent_uid}:\n"
    else:
        agent_uid = pwd.getpwnam("mqtt-agent").pw_uid
    passwd += f"polkit-test-other:x:{other_uid}:{other_uid}::/nonexistent:/usr/sbin/nologin\n"
    group += f"polkit-test-other:x:{other_uid}:\n"
    (work / "passwd").write_text(passwd)
    (work / "group").write_text(group)
    # An abstract socket: polkitd drops to its own user, which cannot enter pytest's private temp dir.
    (work / "bus.conf").write_text(BUS_CONF.format(socket=f"/mqtt-agent-test/polkit-{os.getpid()}-{tmp_path.name}"))
    (work / "cases").write_text("".join(f"{name} {who} {action} {unit} {verb}\n"
                                        for name, (who, action, unit, verb, _) in CASES.items()))
    # polkitd drops to its own user: it must be able to read what is bind-mounted.
    for path in (work, work / "rules.d", *(work / "rules.d").iterdir(), work / "passwd", work / "group"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    script = work / "harness.sh"
    script.write_text(HARNESS)
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", str(script), str(work),
                             str(agent_uid), str(other_uid)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    answers = dict(line.rsplit(" ", 1) for line in result.stdout.splitlines() if line)
    assert set(answers) == set(CASES), result.stdout + result.stderr
    return {name: code == "0" for name, code in answers.items()}


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a private mount namespace")


@needs_root
def test_rule_grants_exactly_the_named_units_and_the_reboot(tmp_path):
    allowed = run_polkit(tmp_path, RULES)
    expected = {name: case[-1] for name, case in CASES.items()}
    assert allowed == expected


@needs_root
def test_without_the_rule_nothing_is_allowed(tmp_path):
    # The control: the grants above come from the rule, not from this machine's defaults.
    allowed = run_polkit(tmp_path, None)
    assert not any(allowed.values()), allowed
