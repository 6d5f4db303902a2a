import subprocess
import sys

MODULES = ["sdxl_client", "sdxl_client.client", "sdxl_client.params", "sdxl_client.cli", "sdxl_client.output",
           "sdxl_client.demo", "sdxl_wire", "sdxl_wire.images"]


def test_the_client_imports_no_torch_core_or_services():
    code = (
        f"import importlib, sys\nfor m in {MODULES!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'sdxl_core', 'sdxl_services', 'numpy'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
