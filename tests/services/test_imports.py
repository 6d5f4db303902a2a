import pkgutil
import subprocess
import sys

import sdxl_services


def test_the_services_import_nothing_of_the_client_package():
    modules = [f"sdxl_services.{m.name}" for m in pkgutil.iter_modules(sdxl_services.__path__) if m.name != "__main__"]
    assert "sdxl_services.launch" in modules and "sdxl_services.orchestrator" in modules
    code = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sdxl_client'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
