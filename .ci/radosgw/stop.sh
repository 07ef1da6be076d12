#!/bin/bash
# Stop radosgw, the OSD and the monitor started by start.sh; remove all data.
B=/tmp/radosgw
for n in client.rgw osd.0 mon.a; do
  f=$B/run/$n.pid
  if [ -f $f ]; then
    p=$(cat $f)
    kill "$p" 2>/dev/null
    for i in $(seq 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$p" 2>/dev/null
  fi
done
rm -rf $B/mon $B/osd $B/rgw $B/run $B/log $B/monmap $B/ceph.conf
echo stopped
