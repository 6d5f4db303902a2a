"""A deploy test whose tool is missing skips with the reason, and fails under CI, where a skip would hide a gap."""

import shutil

import pytest

from .conftest import require_tool


@pytest.fixture
def no_tools(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)


def test_a_missing_tool_skips_naming_it_and_how_to_install_it(no_tools, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"kubectl is not on PATH; .*: install kubectl"):
        require_tool("kubectl", "it renders the manifests", "install kubectl")


@pytest.mark.parametrize("ci", ["true", "1"])
def test_a_missing_tool_fails_under_ci(no_tools, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match=r"kubectl is not on PATH; .*: install kubectl.*CI is set"):
        require_tool("kubectl", "it renders the manifests", "install kubectl")


def test_a_present_tool_is_its_path(monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(shutil, "which", lambda name: f"/opt/bin/{name}")
    assert require_tool("kubectl", "it renders the manifests", "install kubectl") == "/opt/bin/kubectl"
