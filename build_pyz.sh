#!/bin/sh
# Build serve-package.pyz, a self-contained zipapp, from serve_package.py.
#
#   sh build_pyz.sh [OUTPUT]     (default: serve-package.pyz beside this script)
#
# Reproducible: the archive holds one entry, __main__.py (a copy of serve_package.py), with a
# fixed timestamp and mode, so two builds of the same source give the same bytes on any machine.
# Needs only python3.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/serve-package.pyz"}
python=${PYTHON:-python3}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir "$stage/app"
cp "$here/serve_package.py" "$stage/app/__main__.py"
chmod 0644 "$stage/app/__main__.py"
touch -d '1980-01-02 00:00:00 UTC' "$stage/app/__main__.py"
TZ=UTC "$python" -m zipapp "$stage/app" -o "$stage/out.pyz" -p '/usr/bin/env python3'
mv "$stage/out.pyz" "$out"
echo "built $out"
"$python" -c 'import hashlib, sys; print("sha256 " + hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$out"
