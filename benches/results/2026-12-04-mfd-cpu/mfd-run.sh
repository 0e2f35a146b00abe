#!/bin/bash
# usage: mfd-run.sh BIN N  -> prints: wall_send user+sys_send user+sys_recv
BIN=$1; N=$2; D=/dev/shm/mfdcpu
rm -f $D/dst.img $D/mig.sock
/usr/bin/time -f "%e %U %S" -o $D/recv.time $BIN recv --ram mem=$D/dst.img --from unix:$D/mig.sock --multifd $N > $D/recv.log 2>&1 &
RP=$!
for i in $(seq 100); do [ -S $D/mig.sock ] && break; sleep 0.05; done
/usr/bin/time -f "%e %U %S" -o $D/send.time $BIN send --ram mem=$D/src.img --to unix:$D/mig.sock --multifd $N > $D/send.log 2>&1
wait $RP
read sw su ss < $D/send.time; read rw ru rs < $D/recv.time
echo "$(basename $(dirname $(dirname $BIN)))$BIN send_wall=$sw send_cpu=$(echo "$su+$ss"|bc) recv_cpu=$(echo "$ru+$rs"|bc) ($ru u $rs s) tt=$(grep -o '"total-time":[0-9]*' $D/recv.log)"
