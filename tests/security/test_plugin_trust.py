"""Plugins load only from the installed environment: a plugin distribution or module lying in the
working directory is never imported; --block-plugin names must exist; --plugin failures are one line."""
import subprocess
import sys
import textwrap

import pytest

from amct_pipeline.cli.main import main
from amct_pipeline.errors import PluginError
from amct_pipeline.session import AUTOLOAD_ENV, Session


def plant_plugin(folder, marker):
    """A fake installed distribution in ``folder`` whose plugin module writes ``marker`` when imported."""
    info = folder / "evil_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evil-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[amct_pipeline]\nevil = evil_mod\n")
    (folder / "evil_mod.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")


def test_python_m_in_an_untrusted_folder_does_not_load_its_plugin(tmp_path):
    plant_plugin(tmp_path, tmp_path / "PWNED")
    env = {k: v for k, v in __import__("os").environ.items() if k != AUTOLOAD_ENV}
    done = subprocess.run([sys.executable, "-m", "amct_pipeline", "list", "plugins"], cwd=tmp_path,
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "builtin" in done.stdout and "evil" not in done.stdout
    assert not (tmp_path / "PWNED").exists()


def test_session_ignores_distributions_in_the_working_directory(tmp_path, monkeypatch):
    plant_plugin(tmp_path, tmp_path / "PWNED")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    for entry in ("", ".", str(tmp_path)):
        monkeypatch.setattr(sys, "path", [entry] + [p for p in sys.path if p not in ("", ".")])
        names = [name for name, _ in Session().plugin_names()]
        assert "evil" not in names and "builtin" in names
    assert not (tmp_path / "PWNED").exists()
    # the same folder put on the path on purpose (not the working directory) is an installation
    elsewhere = tmp_path.parent / (tmp_path.name + "_cwd")
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + sys.path)
    assert "evil" in [name for name, _ in Session().plugin_names()]
    sys.modules.pop("evil_mod", None)


def test_misspelt_block_plugin_is_an_error_listing_known_plugins(capsys):
    assert main(["list", "passes", "--block-plugin", "bulitin_typo"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--block-plugin bulitin_typo: no installed plugin is named 'bulitin_typo'" in err[0]
    assert "installed plugins:" in err[0]
    with pytest.raises(PluginError, match="installed plugins"):
        Session(load_entrypoints=False, block=["nope"])


def test_block_plugin_suggests_the_installed_name(monkeypatch):
    from amct_pipeline.plugins import discovery
    monkeypatch.setattr(discovery, "installed_plugin_names", lambda group: ["example"])
    with pytest.raises(PluginError, match=r"did you mean 'example'\?.*installed plugins: example"):
        Session(load_entrypoints=False, block=["exampel"])
    Session(load_entrypoints=False, block=["example"])        # a real name is fine


@pytest.mark.parametrize("source,expected", [
    (None, "no module 'amct_no_such_plugin_xyz' is installed"),
    ("raise RuntimeError('boom\\nsecond line')", "importing it failed: RuntimeError: boom second line"),
    ("def broken(:\n", "importing it failed: SyntaxError"),
    ("import amct_missing_dependency_xyz\n", "ModuleNotFoundError: No module named 'amct_missing_dependency_xyz'"),
])
def test_missing_or_broken_plugin_module_is_one_line(tmp_path, monkeypatch, capsys, source, expected):
    name = "amct_no_such_plugin_xyz"
    if source is not None:
        name = f"amct_broken_plugin_{len(source)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["--plugin", name, "list", "plugins"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"amct-pipeline: error: --plugin {name}:"), err
    assert expected in err[0] and "internal error" not in err[0]


def test_plugin_option_does_not_import_from_the_working_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "cwd_plugin_xyz.py").write_text(f"open({str(tmp_path / 'PWNED')!r}, 'w').write('x')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [""] + sys.path)
    assert main(["--plugin", "cwd_plugin_xyz", "list", "plugins"]) == 1
    assert "is installed in this environment" in capsys.readouterr().err
    assert not (tmp_path / "PWNED").exists()
    assert main(["--plugin", "../etc/passwd", "list", "plugins"]) == 1
    assert "not a module name" in capsys.readouterr().err
