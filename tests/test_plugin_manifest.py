"""The npe2 manifest: valid, discovered from the editable install and from a built wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PLUGIN = "napari-apl"
WIDGET = "Adaptive pseudo labelling"


@pytest.fixture(scope="module")
def manifest():
    """The napari-apl manifest as npe2 discovers it."""
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    return pm.get_manifest(PLUGIN)


def test_package_manifest_and_top_level_symlink() -> None:
    # the package holds the real file: a checkout where links become text files (git on Windows by
    # default) still installs a plugin npe2 can load; the top-level name is a relative link to it
    top = REPO / "napari.yaml"
    inner = REPO / "napari_apl" / "napari.yaml"
    assert inner.is_file() and not inner.is_symlink()
    assert top.is_symlink() and os.readlink(top) == "napari_apl/napari.yaml"  # relative: the repo can move
    assert inner.read_bytes() == top.read_bytes()


def test_manifest_is_valid_with_imports() -> None:
    from npe2 import PluginManifest

    mf = PluginManifest.from_file(REPO / "napari.yaml")
    mf.validate_imports()
    proc = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", PLUGIN], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "valid" in proc.stdout


def test_discovered_from_editable_install(manifest) -> None:
    assert manifest.name == PLUGIN
    source = Path(str(manifest._source_file)).resolve()
    assert source == (REPO / "napari.yaml").resolve()
    c = manifest.contributions
    assert {"*.nii", "*.nii.gz"} <= set(c.readers[0].filename_patterns)
    assert {tuple(w.layer_types) for w in c.writers} == {("labels",), ("image",)}
    assert all(".nii.gz" in w.filename_extensions for w in c.writers)
    assert [s.key for s in c.sample_data] == ["ct_phantom"]
    assert [w.display_name for w in c.widgets] == [WIDGET]
    assert [item.command for item in c.menus["napari/layers/segment"]] == [c.widgets[0].command]


def test_menu_is_a_napari_segment_menu() -> None:
    from napari._app_model.constants._menus import MenuId, is_menu_contributable

    assert MenuId.LAYERS_SEGMENT == "napari/layers/segment"
    assert is_menu_contributable("napari/layers/segment")


def test_commands_resolve(manifest) -> None:
    from napari_apl._reader import get_reader
    from napari_apl._sample_data import ct_phantom
    from napari_apl._writer import write_image, write_labels
    from napari_apl.widgets import APLWidget

    impls = {cmd.id: cmd.python_name for cmd in manifest.contributions.commands}
    expected = {
        "napari-apl.get_reader": get_reader,
        "napari-apl.write_labels": write_labels,
        "napari-apl.write_image": write_image,
        "napari-apl.sample_ct_phantom": ct_phantom,
        "napari-apl.make_apl_widget": APLWidget,
    }
    for cmd_id, obj in expected.items():
        module, _, attr = impls[cmd_id].partition(":")
        assert getattr(sys.modules[module], attr) is obj


def test_npe2_picks_our_reader_and_writer(tmp_path: Path) -> None:
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    readers = [r.plugin_name for r in pm.iter_compatible_readers([str(tmp_path / "x.nii.gz")])]
    assert PLUGIN in readers
    assert any(w.plugin_name == PLUGIN for w in pm.iter_compatible_writers(["labels"]))
    assert any(w.plugin_name == PLUGIN for w in pm.iter_compatible_writers(["image"]))


@pytest.mark.viewer
def test_widget_menu_entry_in_segment_menu(make_napari_viewer) -> None:
    from napari._app_model import get_app_model

    make_napari_viewer()
    app = get_app_model()
    items = app.menus.get_menu("napari/layers/segment")
    commands = [getattr(item, "command", None) for item in items]
    assert any(cmd is not None and cmd.id == "napari-apl.make_apl_widget" for cmd in commands)


@pytest.mark.slow
def test_manifest_found_in_a_built_wheel(tmp_path: Path) -> None:
    """Build the wheel, install it in a fresh venv, and let npe2 find the manifest in that venv."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(REPO)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = dist.glob("napari_apl-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("napari_apl/napari.yaml") == (REPO / "napari.yaml").read_bytes()  # content, not a link
        entry_points = zf.read(next(n for n in zf.namelist() if n.endswith("entry_points.txt"))).decode()
        licence = [n for n in zf.namelist() if n.endswith("LICENSE")]
        assert licence and b"BSD 3-Clause" in zf.read(licence[0])  # the licence's text travels with the wheel
    assert "napari-apl = napari_apl:napari.yaml" in entry_points
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
        timeout=60,
    )
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    probe = (
        "import json, npe2, napari_apl\n"
        "pm = npe2.PluginManager.instance(); pm.discover()\n"
        "mf = pm.get_manifest('napari-apl')\n"
        "print(json.dumps({'source': str(mf._source_file), 'package': napari_apl.__file__,"
        " 'widgets': [w.display_name for w in mf.contributions.widgets]}))\n"
    )
    proc = subprocess.run(
        [str(python), "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    site = venv / "lib"
    assert Path(found["source"]).resolve().is_relative_to(site.resolve())
    assert Path(found["package"]).resolve().is_relative_to(site.resolve())
    assert found["widgets"] == [WIDGET]
