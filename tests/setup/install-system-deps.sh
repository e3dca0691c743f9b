#!/bin/sh
# Install the Debian packages the test suite drives, when they are missing.
set -eu
need=""
command -v chromium >/dev/null 2>&1 || need="$need chromium"
command -v chromedriver >/dev/null 2>&1 || need="$need chromium-driver"
command -v avahi-browse >/dev/null 2>&1 || need="$need avahi-utils"
command -v avahi-daemon >/dev/null 2>&1 || need="$need avahi-daemon"
command -v dbus-daemon >/dev/null 2>&1 || need="$need dbus"
command -v ip >/dev/null 2>&1 || need="$need iproute2"
command -v wrk >/dev/null 2>&1 || need="$need wrk"
command -v setpriv >/dev/null 2>&1 || need="$need util-linux"
command -v git >/dev/null 2>&1 || need="$need git"  # the real-OpenCode suite makes a git project
# Wide-area DNS-SD tests run their own named in a network namespace (tests/test_lan_netns.py).
{ command -v named >/dev/null 2>&1 || [ -x /usr/sbin/named ]; } || need="$need bind9"
command -v dig >/dev/null 2>&1 || need="$need bind9-dnsutils"
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "missing system packages:$need (install them as root; their tests will be skipped)" >&2
    exit 0
fi
echo "installing system packages:$need"
export DEBIAN_FRONTEND=noninteractive
# avahi-daemon's package starts the daemon on install, which would then answer mDNS on this machine's
# real interfaces (and bind9's would start named); tests run their own inside network namespaces.
# policy-rc.d exiting 101 forbids service starts for the duration of the install.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
fi
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $need >/dev/null
