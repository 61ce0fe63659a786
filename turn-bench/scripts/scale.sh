#!/bin/bash
# Side by side in one run: the release turn-server, coturn 4.17.1 (the current release, built
# by `cargo xtask bench` into target/bench/coturn-4.17.1, or COTURN_CURRENT=path/to/turnserver)
# and coturn 4.6.1 (Debian) each holding N
# allocations (each with a permission), a trickle of Send indications through them (one per
# allocation per 10 s), one Refresh of every one, then the deletes; all on 127.0.0.0/8.
# Run as root from the repository after `cargo build --release -p turn-server -p turn-bench`:
#   bash turn-bench/scripts/scale.sh 18000
# Prints one line of figures per server (the JSON of `turn-bench alloc` is in /tmp).
set -u
N=${1:-18000}
B=target/release
# A free UDP port in 10000-19999: outside the relay range (49152-65535) turn-server refuses
# to listen in, and outside the ephemeral ports.
port() { python3 -c "
import random, socket
while True:
    p = random.randint(10000, 19999)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(('127.0.0.1', p)); print(p); break
    except OSError:
        pass
"; }
run_bench() { # name pid port
  sleep 1.5
  echo "== $1 (pid $2)"
  $B/turn-bench alloc --server 127.0.0.1:$3 -u bench -w bench --realm bench --count $N --server-pid $2 --hold 10 --trickle $((N/10)) --refresh --settle 1 --json > /tmp/scale-$1.json
  python3 -c "import json;r=json.load(open('/tmp/scale-$1.json'));print({k:r.get(k) for k in ['allocated','allocs_per_s','cpu_us_per_alloc','bytes_per_allocation','refreshes_per_s','cpu_us_per_refresh','deletes_per_s','cpu_us_per_delete','trickle_sent','trickle_received','first_error']})"
}
P=$(port)
$B/turn-server -L 127.0.0.1 -p $P --workers 2 --relay-ip 127.0.0.2 --relay-ip 127.0.0.3 --user bench:bench --realm bench --allow-loopback-peers --user-quota 0 --total-quota 0 --address-quota 0 --unauthenticated-responses-per-sec 0 --binding-responses-per-sec 0 --bpf-pin-root /sys/fs/bpf/turn-scale > /tmp/scale-ts.log 2>&1 &
TS=$!
run_bench turn-server $TS $P
kill -INT $TS; wait $TS 2>/dev/null
coturn() { # name binary
  P=$(port)
  "$2" -n --listening-ip=127.0.0.1 --relay-ip=127.0.0.2 --relay-ip=127.0.0.3 --listening-port=$P --lt-cred-mech --user=bench:bench --realm=bench --allow-loopback-peers --no-cli --no-tls --no-dtls --no-tcp --relay-threads=2 --log-file=/tmp/scale-$1.log --simple-log --no-stdout-log > /dev/null 2>&1 &
  CT=$!
  run_bench $1 $CT $P
  kill -INT $CT; sleep 1; kill -9 $CT 2>/dev/null; wait $CT 2>/dev/null
}
CURRENT=${COTURN_CURRENT:-target/bench/coturn-4.17.1/bin/turnserver}
if [ -x "$CURRENT" ]; then
  coturn coturn-4.17.1 "$CURRENT"
else
  echo "== coturn 4.17.1: $CURRENT not found (cargo xtask bench builds it; or set COTURN_CURRENT)"
fi
coturn coturn-4.6.1 turnserver
