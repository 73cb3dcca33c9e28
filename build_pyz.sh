#!/bin/sh
# Build serve-package.pyz, a self-contained zipapp, from serve_package.py.
#
#   sh build_pyz.sh [OUTPUT]     (default: serve-package.pyz beside this script)
#
# The archive holds three entries:
#   __main__.py         a launcher small enough to parse on any Python, 2.7 included, so that an
#                       interpreter older than 3.6 is told so in one sentence, not a SyntaxError
#   serve_package.py    the program
#   serve_package.pyc   its bytecode for the interpreter that built the archive (PEP 552,
#                       unchecked hash: no timestamp inside), which zipimport uses when the
#                       running interpreter is the same version and ignores otherwise; a zipapp
#                       cannot cache bytecode, so without it every start compiles the module
# Reproducible: fixed timestamps and modes, so the same source built by the same python3 gives
# the same bytes on any machine. Needs only python3 (PYTHON=... to choose another).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/serve-package.pyz"}
python=${PYTHON:-python3}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir "$stage/app"
cp "$here/serve_package.py" "$stage/app/serve_package.py"
cat > "$stage/app/__main__.py" <<'EOF'
# serve-package.pyz's entry point. It must parse on every Python, so that an old one says what
# it needs instead of failing with a SyntaxError; the program is serve_package.py beside it.
import sys

if sys.version_info < (3, 6):
    sys.stderr.write(
        "serve-package: error: this is Python %d.%d and serve-package needs Python 3.6 or "
        "newer: run it with python3, or in a container with host networking (see the README, "
        "\"Where python3 comes from\").\n" % sys.version_info[:2])
    sys.exit(2)

import serve_package  # noqa: E402

sys.exit(serve_package.main())
EOF
"$python" - "$stage/app" <<'EOF'
import py_compile, sys
if hasattr(py_compile, "PycInvalidationMode"):  # Python 3.7+; without it, no bytecode
    py_compile.compile(sys.argv[1] + "/serve_package.py", cfile=sys.argv[1] + "/serve_package.pyc",
                       dfile="serve_package.py", doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
EOF
chmod 0644 "$stage/app/"*
touch -d '1980-01-02 00:00:00 UTC' "$stage/app/"*
TZ=UTC "$python" -m zipapp "$stage/app" -o "$stage/out.pyz" -p '/usr/bin/env python3'
mv "$stage/out.pyz" "$out"
echo "built $out"
"$python" -c 'import hashlib, sys; print("sha256 " + hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$out"
