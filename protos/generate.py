"""Compile protos/*.proto into psclient/wire/proto (messages, gRPC stubs, .pyi types).

The generated modules are committed. `--check` regenerates into a temporary
directory and fails if anything differs from what is committed, so a .proto
edit can never land without its code.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
PACKAGE_DIR = "psclient/wire/proto"  # import path of the generated modules
INIT_TEXT = '"""Generated protobuf and gRPC modules. Do not edit: run `make proto`."""\n'


def generate(out_root: Path) -> Path:
    """Run protoc; return the directory that holds the generated package."""
    include = str(Path(protoc.__file__).parent / "_proto")
    bin_dir = Path(sys.executable).parent  # mypy-protobuf's plugins sit beside the interpreter
    protos = sorted(PROTO_DIR.glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE_DIR}={PROTO_DIR}",  # virtual path: imports read `psclient.wire.proto.X_pb2`
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *[f"{PACKAGE_DIR}/{p.name}" for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    package = out_root / PACKAGE_DIR
    (package / "__init__.py").write_text(INIT_TEXT)
    return package


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    check = parser.parse_args().check
    target = ROOT / PACKAGE_DIR
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        names = sorted(p.name for p in fresh.iterdir() if p.is_file())
        if check:
            committed = sorted(p.name for p in target.glob("*") if p.is_file())
            _, mismatch, errors = filecmp.cmpfiles(fresh, target, names, shallow=False)
            extra = sorted(set(committed) - set(names))
            if mismatch or errors or extra:
                print(f"generated code is stale: {mismatch + errors + extra}; run `make proto`")
                return 1
            print(f"generated code is up to date ({len(names)} files)")
            return 0
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(fresh / name, target / name)
        print(f"wrote {len(names)} files to {PACKAGE_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
