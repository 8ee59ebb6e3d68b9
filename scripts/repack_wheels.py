"""Wheels of distributions installed in this Python, rebuilt from their installed files (offline).

    python scripts/repack_wheels.py OUT_DIR zarr numcodecs dask ...

``scripts/gpu-session.sh --dry-run`` uses it in place of ``pip download``: the dry run installs
what it would carry to the GPU machine with the same ``pip install --no-index --target`` command,
without the network and for this interpreter (the real ``prepare`` downloads cp312 manylinux
wheels of the same versions). Each wheel holds the files its distribution's ``RECORD`` lists
below site-packages (not ``__pycache__``, not scripts installed outside it), its ``*.dist-info``
with a ``RECORD`` of fresh hashes, and the tag of its ``WHEEL`` file. A name not installed here
is skipped and named on stderr (the GPU machine gets it from ``prepare``'s download).

Prints one line per wheel written; exits 0.
"""

from __future__ import annotations

import base64
import hashlib
import re
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def repack(name: str, out_dir: Path) -> Path:
    """Write the wheel of the installed distribution ``name`` into ``out_dir``; its path.

    Raises:
        PackageNotFoundError: ``name`` is not installed in this Python.
    """
    dist = distribution(name)
    root = Path(dist.locate_file(""))
    files = [f for f in dist.files or [] if not str(f).startswith("..") and "__pycache__" not in f.parts]
    info = next(f.parts[0] for f in files if f.parts[0].endswith(".dist-info"))
    wheel_meta = (root / info / "WHEEL").read_text()
    tags = [t.split("-") for t in re.findall(r"^Tag: (\S+)$", wheel_meta, re.MULTILINE)]
    tag = "-".join(".".join(dict.fromkeys(part)) for part in zip(*tags))  # py2 + py3 -> py2.py3
    stem = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    path = out_dir / f"{stem}-{dist.version}-{tag}.whl"
    record_name = f"{info}/RECORD"
    rows = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as whl:
        for f in files:
            arcname = f.as_posix()
            if arcname == record_name or not (root / f).is_file():
                continue
            data = (root / f).read_bytes()
            whl.writestr(arcname, data)
            rows.append(f"{arcname},{_record_hash(data)},{len(data)}")
        rows.append(f"{record_name},,")
        whl.writestr(record_name, "\n".join(rows) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out_dir, names = Path(args[0]), args[1:]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            print(repack(name, out_dir).name)
        except PackageNotFoundError:
            print(f"repack_wheels: {name} is not installed here: not carried in the dry run", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
