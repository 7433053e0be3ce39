#!/usr/bin/env bash
# `make test-multinode`: DeepSpeed's multi-node launcher (pdsh over ssh, one per-node launcher
# per host) on two "hosts" of this one machine, 127.0.0.1 and 127.0.0.2, then
# tests/integration/test_multinode.py against them. The steps are the ones README "Several machines"
# gives for two real servers; here the server is an sshd of our own that listens on those
# two loopback addresses only, with throw-away keys, and is stopped (with everything it
# started) on exit.
#
# Nothing may leave the machine: where this process may make a network namespace, the
# sshd and the tests run in one whose only interface is `lo`, so traffic to any other
# address cannot even be attempted; everywhere, the tests check that every rank's
# connections were loopback (GLOO_SOCKET_IFNAME=lo reaches the ranks via .deepspeed_env).
set -euo pipefail
SELF=$(readlink -f "$0")
cd "$(dirname "$SELF")/../.."
PY=${PY:-.venv/bin/python}

install_packages() {
    local missing=()
    [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
    command -v pdsh >/dev/null || missing+=(pdsh)
    command -v ssh-keygen >/dev/null || missing+=(openssh-client)
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" != 0 ]; then
        echo "test-multinode: needs ${missing[*]}: sudo apt-get install -y ${missing[*]}" >&2
        exit 2
    fi
    # Debian starts a package's service on install; policy-rc.d (exit 101) forbids it, so
    # no system sshd on port 22 of every interface appears.
    local policy=/usr/sbin/policy-rc.d made_policy=
    if [ ! -e $policy ]; then
        printf '#!/bin/sh\nexit 101\n' > $policy && chmod +x $policy && made_policy=1
    fi
    echo "test-multinode: apt-get install ${missing[*]}"
    local status=0
    { apt-get -qq -o DPkg::Lock::Timeout=300 update &&
      DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=300 install -y \
          --no-install-recommends "${missing[@]}" >/dev/null; } || status=$?
    [ -z "$made_policy" ] || rm -f $policy
    [ $status -eq 0 ] || { echo "test-multinode: apt-get failed ($status)" >&2; exit $status; }
}

# `ip link set lo up` without needing iproute2: SIOCGIFFLAGS / SIOCSIFFLAGS | IFF_UP.
LO_UP='import fcntl, socket, struct
s = socket.socket()
flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1]
fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))'

if [ -z "${GPTBENCH_MULTINODE_INSIDE:-}" ]; then
    install_packages
    if unshare --net true 2>/dev/null; then
        echo "test-multinode: network: own namespace, loopback only"
        exec unshare --net env GPTBENCH_MULTINODE_INSIDE=netns bash "$SELF" "$@"
    fi
    echo "test-multinode: network: shared (no permission for a namespace here); the tests" \
         "check every rank's addresses"
    export GPTBENCH_MULTINODE_INSIDE=shared
fi
[ "$GPTBENCH_MULTINODE_INSIDE" != netns ] || "$PY" -c "$LO_UP"

WORK=$(mktemp -d /tmp/gptbench-multinode.XXXXXX)
made_privsep=
stop_sshd() {
    # The listener and every session it started (with whatever still runs in them), by pid.
    if [ -f "$WORK/sshd.pid" ]; then
        "$PY" - "$(cat "$WORK/sshd.pid")" <<'EOF' || true
import sys, psutil
try:
    top = psutil.Process(int(sys.argv[1]))
except psutil.NoSuchProcess:
    sys.exit(0)
procs = [top] + top.children(recursive=True)
for p in procs:
    try:
        p.terminate()
    except psutil.NoSuchProcess:
        pass
_, alive = psutil.wait_procs(procs, timeout=5)
for p in alive:
    p.kill()
EOF
    fi
    rm -rf "$WORK"
    [ -z "$made_privsep" ] || rmdir /run/sshd 2>/dev/null || true
}
trap stop_sshd EXIT

# 1. Keys: a host key for the sshd, a user key for the client, known_hosts for both names.
ssh-keygen -q -t ed25519 -N '' -C gptbench-multinode-host -f "$WORK/host_key"
ssh-keygen -q -t ed25519 -N '' -C gptbench-multinode-user -f "$WORK/user_key"
cp "$WORK/user_key.pub" "$WORK/authorized_keys"
PORT=$("$PY" -c 'import socket
for port in range(2222, 2300):
    try:
        for address in ("127.0.0.1", "127.0.0.2"):
            socket.create_server((address, port)).close()
    except OSError:
        continue
    print(port)
    break')
echo "[127.0.0.1]:$PORT,[127.0.0.2]:$PORT $(cut -d' ' -f1,2 "$WORK/host_key.pub")" \
    > "$WORK/known_hosts"

# 2. An sshd on the two loopback addresses only, keys only, no DNS lookups of clients.
cat > "$WORK/sshd_config" <<EOF
Port $PORT
ListenAddress 127.0.0.1
ListenAddress 127.0.0.2
HostKey $WORK/host_key
AuthorizedKeysFile $WORK/authorized_keys
PidFile $WORK/sshd.pid
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
X11Forwarding no
AllowTcpForwarding no
PrintMotd no
LogLevel ERROR
EOF
if [ ! -d /run/sshd ]; then mkdir -p /run/sshd && made_privsep=1; fi  # privilege separation
/usr/sbin/sshd -f "$WORK/sshd_config" -E "$WORK/sshd.log"
for _ in $(seq 50); do [ -s "$WORK/sshd.pid" ] && break; sleep 0.1; done

# 3. The hostfile and the ssh arguments pdsh (and gptbench's checks) use.
printf '127.0.0.1 slots=2\n127.0.0.2 slots=2\n' > "$WORK/hostfile"
export PDSH_RCMD_TYPE=ssh
export PDSH_SSH_ARGS_APPEND="-F /dev/null -p $PORT -i $WORK/user_key -o IdentitiesOnly=yes \
-o UserKnownHostsFile=$WORK/known_hosts -o StrictHostKeyChecking=yes -o LogLevel=ERROR"
export GPTBENCH_MULTINODE_HOSTFILE="$WORK/hostfile"
export GPTBENCH_MULTINODE_SSHD_PID
GPTBENCH_MULTINODE_SSHD_PID=$(cat "$WORK/sshd.pid")
echo "test-multinode: sshd $GPTBENCH_MULTINODE_SSHD_PID on 127.0.0.1:$PORT and 127.0.0.2:$PORT"
pdsh -S -w 127.0.0.1,127.0.0.2 'echo reached over ssh: $SSH_CONNECTION'

# 4. The runs.
"$PY" -m pytest -q -s -p no:cacheprovider tests/integration/test_multinode.py "$@"
