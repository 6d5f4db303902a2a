"""sdxl_core knows nothing of the wire, and diffusers is only a test oracle."""

import subprocess
import sys

FORBIDDEN = ("grpc", "google.protobuf", "diffusers", "sdxl_services", "sdxl_client")

IMPORT_ALL = """
import importlib, pkgutil, sys
import sdxl_core
for mod in pkgutil.walk_packages(sdxl_core.__path__, "sdxl_core."):
    if not mod.name.endswith("__main__"):
        importlib.import_module(mod.name)
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in {"grpc", "google", "diffusers", "sdxl_services", "sdxl_client"})))
"""


def test_importing_every_core_module_pulls_in_no_grpc_protobuf_or_diffusers():
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, check=True)
    loaded = out.stdout.split()
    offending = [m for m in loaded if m.startswith(FORBIDDEN)]
    assert not offending, f"sdxl_core imported {offending}"
