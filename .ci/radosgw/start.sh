#!/bin/bash
# A real S3-compatible server for the S3 tests: a tiny Ceph cluster (1 mon, 1 memstore OSD, no mgr, auth off)
# plus radosgw (beast, 127.0.0.1:7480) under /tmp/radosgw. Idempotent; ~13 s from nothing.
#   apt-get install -y --no-install-recommends ceph-mon ceph-osd radosgw     (Debian 12: Ceph 16.2)
#   .ci/radosgw/start.sh
#   CLT_PIPE_TEST_S3_ENDPOINT=http://127.0.0.1:7480 CLT_PIPE_TEST_S3_KEY=clttest \
#     CLT_PIPE_TEST_S3_SECRET=clttestsecret python -m pytest tests/test_s3.py tests/test_reliability.py -k s3
#   .ci/radosgw/stop.sh
set -euo pipefail
B=/tmp/radosgw
CONF=$B/ceph.conf
FSID=6b1e2a52-0000-4000-8000-00000000c17e
PORT=7480
T0=$(date +%s.%N)
mkdir -p $B/{mon,osd,rgw,log,run}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }


# Fast path: everything already up.
if alive $B/run/mon.a.pid && alive $B/run/osd.0.pid && alive $B/run/client.rgw.pid \
   && curl -s -o /dev/null "http://127.0.0.1:$PORT/"; then
  echo "radosgw already up on http://127.0.0.1:$PORT"; exit 0
fi
# memstore keeps objects in the OSD's RAM: if the mon or OSD is gone the
# cluster cannot be resumed, so wipe and rebuild from nothing.
if ! { alive $B/run/mon.a.pid && alive $B/run/osd.0.pid; }; then
  "$(dirname "$0")/stop.sh" >/dev/null
  mkdir -p $B/{mon,osd,rgw,log,run}
fi
if [ ! -f $CONF ]; then
cat > $CONF <<EOF
[global]
fsid = $FSID
mon host = 127.0.0.1:6789
mon initial members = a
public network = 127.0.0.0/8
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = false
# radosgw defaults ms_mon_client_mode to 'secure', which auth=none cannot do
ms mon client mode = crc secure
ms bind ipv4 = true
ms bind ipv6 = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 2
log file = $B/log/\$name.log
pid file = $B/run/\$name.pid
admin socket = $B/run/\$name.asok
run dir = $B/run
crash dir = $B/log/crash
keyring = /dev/null
[mon.a]
mon data = $B/mon/a
[osd.0]
osd data = $B/osd/0
osd objectstore = memstore
memstore device bytes = 2147483648
osd journal size = 0
osd max object name len = 460
osd max object namespace len = 64
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:$PORT
rgw data = $B/rgw
rgw dns name = localhost
rgw enable usage log = false
rgw thread pool size = 64
EOF
fi

# --- monitor ---
if [ ! -f $B/mon/a/store.db/CURRENT ] && [ ! -d $B/mon/a/store.db ]; then
  rm -rf $B/mon/a; mkdir -p $B/mon/a
  monmaptool --create --clobber --fsid $FSID --addv a "[v2:127.0.0.1:3300,v1:127.0.0.1:6789]" $B/monmap >/dev/null
  ceph-mon -c $CONF -i a --mkfs --monmap $B/monmap
fi
alive $B/run/mon.a.pid || ceph-mon -c $CONF -i a 2>>$B/log/stderr.log
for i in $(seq 60); do timeout 5 ceph -c $CONF mon stat >/dev/null 2>&1 && break; sleep 0.5; done

# --- osd (memstore: data lives in RAM, so re-mkfs on every start) ---
if ! alive $B/run/osd.0.pid; then
  ceph -c $CONF osd ls 2>/dev/null | grep -qx 0 || ceph -c $CONF osd create >/dev/null
  rm -rf $B/osd/0; mkdir -p $B/osd/0
  ceph-osd -c $CONF -i 0 --mkfs --osd-uuid $(cat /proc/sys/kernel/random/uuid) >/dev/null 2>&1
  ceph-osd -c $CONF -i 0 2>>$B/log/stderr.log
fi
for i in $(seq 120); do
  ceph -c $CONF osd dump 2>/dev/null | grep -q '^osd.0 up' && break; sleep 0.5
done

# --- radosgw ---
# a radosgw that is alive but not answering (e.g. still shutting down): end it
if alive $B/run/client.rgw.pid && ! curl -s -o /dev/null "http://127.0.0.1:$PORT/"; then
  p=$(cat $B/run/client.rgw.pid); kill $p 2>/dev/null || true
  for i in $(seq 60); do kill -0 $p 2>/dev/null || break; sleep 0.5; done
  kill -9 $p 2>/dev/null || true
fi
alive $B/run/client.rgw.pid || timeout 180 radosgw -c $CONF -n client.rgw 2>>$B/log/stderr.log
for i in $(seq 240); do
  curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.5
done
curl -s -o /dev/null "http://127.0.0.1:$PORT/" || { echo "radosgw did not answer on $PORT" >&2; exit 1; }

# --- S3 user ---
radosgw-admin -c $CONF user info --uid=test >/dev/null 2>&1 || \
  radosgw-admin -c $CONF user create --uid=test --display-name=test \
    --access-key=clttest --secret=clttestsecret >/dev/null
echo "radosgw up on http://127.0.0.1:$PORT (key clttest / clttestsecret) in $(echo "$(date +%s.%N) - $T0" | bc)s"
