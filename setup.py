"""Build hook: generate the sdxl.v1 Python code from protos/ before the packages are collected.

Everything else about the project is in pyproject.toml. The code is written in place, beside the
.proto files (gitignored), so `pip install .` and `pip install -e .` both find it.
"""

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTOS = ROOT / "protos"


def generate_protos() -> None:
    """Run grpcio-tools' protoc on protos/sdxl/v1/*.proto: *_pb2.py, *_pb2_grpc.py and *_pb2.pyi."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/struct.proto and friends
    sources = sorted(str(p) for p in (PROTOS / "sdxl" / "v1").glob("*.proto"))
    args = ["grpc_tools.protoc", f"-I{PROTOS}", f"-I{well_known}", f"--python_out={PROTOS}",
            f"--grpc_python_out={PROTOS}", f"--pyi_out={PROTOS}", *sources]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTOS / 'sdxl' / 'v1'}/*.proto")


class BuildPyWithProtos(build_py):
    """build_py that generates the protobuf modules first, so they are collected like any module."""

    def run(self):
        generate_protos()
        super().run()


# sdxl_core as found; the others come from the package-dir mapping in pyproject.toml, which find cannot follow.
PACKAGES = [*find_packages(str(ROOT), include=["sdxl_core", "sdxl_core.*"]),
            "sdxl", "sdxl.v1", "sdxl_wire", "sdxl_services", "sdxl_client"]

setup(packages=PACKAGES, cmdclass={"build_py": BuildPyWithProtos})
