"""Fetch the web UI's one library, Apache ECharts, from the npm registry into
antrea_flow/aggregator/ui/vendor/ (what `make setup` runs; a wheel built afterwards
carries it). The tarball is checked against the integrity hash npm publishes for it, so
only that release is ever installed. Does nothing when the file is there already.

    python build/ui_assets.py [--registry URL]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

PACKAGE = "echarts"
VERSION = "5.6.0"
# `npm view echarts@5.6.0 dist.integrity`
INTEGRITY = (
    "sha512-"
    "oTbVTsXfKuEhxftHqL5xprgLoc0k7uScAwtryCgWF6hPYFLRwOUHiFmHGCBKP5NPFNkDVopOieyUqYGH8Fa3kA=="
)
FILES = {"package/dist/echarts.min.js": "echarts.min.js", "package/LICENSE": "ECHARTS-LICENSE"}
VENDOR = Path(__file__).resolve().parent.parent / "antrea_flow" / "aggregator" / "ui" / "vendor"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default="https://registry.npmjs.org")
    args = parser.parse_args()
    marker = VENDOR / f".{PACKAGE}-{VERSION}"
    if marker.exists() and all((VENDOR / name).exists() for name in FILES.values()):
        return 0
    url = f"{args.registry}/{PACKAGE}/-/{PACKAGE}-{VERSION}.tgz"
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            tarball = response.read()
    except OSError as exc:
        print(f"ui_assets: cannot fetch {url}: {exc}", file=sys.stderr)
        return 1
    algorithm, _, expected = INTEGRITY.partition("-")
    digest = base64.b64encode(hashlib.new(algorithm, tarball).digest()).decode()
    if digest != expected:
        print(f"ui_assets: {url} is not the published {PACKAGE} {VERSION}", file=sys.stderr)
        return 1
    VENDOR.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tarball)) as archive:
        for member, name in FILES.items():
            source = archive.extractfile(member)
            assert source is not None, member
            (VENDOR / name).write_bytes(source.read())
    for old in VENDOR.glob(f".{PACKAGE}-*"):
        old.unlink()
    marker.touch()
    print(f"ui_assets: {PACKAGE} {VERSION} in {VENDOR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
