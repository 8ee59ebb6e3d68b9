"""Code hashes: a stage's hash covers exactly the modules it imports."""

from __future__ import annotations

from unet_core.common.provenance import code_hash, module_closure


def test_ingest_closure_is_its_imports_only():
    closure = module_closure("unet_core.cli.ingest")
    assert {"unet_core.io.ingest", "unet_core.io.tiff", "unet_core.io.ngff", "unet_core.common.atomic"} <= set(closure)
    assert "unet_core.model.unet" not in closure  # torch model code does not rerun ingest


def test_code_hash_changes_with_an_imported_module(monkeypatch):
    import unet_core.common.provenance as prov

    before = code_hash("ingest")
    real = prov._module_path

    def patched(name):
        path = real(name)
        if name == "unet_core.io.tiff":
            copy = path.with_name("_patched_tiff_io.txt")
            copy.write_text(path.read_text() + "\n# changed\n")
            return copy
        return path

    monkeypatch.setattr(prov, "_module_path", patched)
    prov.module_closure.cache_clear()
    try:
        assert code_hash("ingest") != before
    finally:
        real("unet_core.io.tiff").with_name("_patched_tiff_io.txt").unlink(missing_ok=True)
        prov.module_closure.cache_clear()
