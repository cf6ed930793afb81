"""describe_model / describe_catalog: what a catalog model is, read from its folder, on the tiny
llama and llava, the real SmolLM2 (4-bit), all-MiniLM-L6-v2 and whisper tiny.en, plus broken
folders that must never raise."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from conftest import _cache_dir, write_catalog

from mlx_fusion.registry.catalog import Catalog, ModelKind, ModelSpec
from mlx_fusion.registry.describe import MAX_CONFIG_BYTES, describe_catalog, describe_model

KEYS = {
    "id",
    "kind",
    "aliases",
    "path",
    "hub",
    "pinned",
    "keep_alive_s",
    "max_concurrent_jobs",
    "family",
    "context_length",
    "quantization",
    "dtype",
    "size_on_disk_bytes",
    "error",
}


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_vlm import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("describe") / "tiny-llava")


@pytest.fixture(scope="session")
def whisper_dir() -> Path:
    from mlx_fusion.ct2 import ensure_whisper_tiny

    try:
        return ensure_whisper_tiny(_cache_dir())
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def minilm() -> Path:
    from mlx_fusion.registry.kinds.embeddings import minilm_dir

    try:
        return minilm_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def spec_of(tmp_path: Path, kind: str, path: Path, **entry: Any) -> ModelSpec:
    """The entry ``m`` of a one-model catalog file, loaded as the worker loads it."""
    catalog = write_catalog(tmp_path / "models.toml", {"m": {"kind": kind, "path": path, **entry}})
    return Catalog.load(catalog).resolve("m")


def walked_size(root: Path) -> int:
    """Bytes of the regular files under ``root`` (os.walk + lstat; links not counted)."""
    total = 0
    for parent, _, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(parent, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def llama_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----- real model folders ---------------------------------------------------------------------


def test_tiny_llama_is_a_llama_with_its_position_limit_and_no_quantization(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    info = describe_model(spec_of(tmp_path, "lm", tiny_model_dir))
    assert (info["family"], info["context_length"], info["quantization"]) == ("llama", 512, None)
    assert info["error"] is None


def test_size_on_disk_is_the_sum_of_the_regular_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    info = describe_model(spec_of(tmp_path, "lm", tiny_model_dir))
    assert info["size_on_disk_bytes"] == walked_size(tiny_model_dir) > 0


def test_catalog_fields_are_copied_and_the_dict_has_exactly_the_documented_keys(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    spec = spec_of(
        tmp_path,
        "lm",
        tiny_model_dir,
        aliases=["t1", "t2"],
        pinned=True,
        keep_alive_s=30,
        max_concurrent_jobs=2,
    )
    info = describe_model(spec)
    assert set(info) == KEYS
    assert info["id"] == "m" and info["kind"] == "lm" and info["hub"] is None
    assert info["aliases"] == ["t1", "t2"]
    assert info["path"] == str(tiny_model_dir)
    assert (info["pinned"], info["keep_alive_s"], info["max_concurrent_jobs"]) == (True, 30, 2)
    assert json.loads(json.dumps(info)) == info


def test_smollm2_reports_the_quantization_its_config_stores(
    tmp_path: Path, smollm2_dir: Path
) -> None:
    stored = json.loads((smollm2_dir / "config.json").read_text(encoding="utf-8"))["quantization"]
    info = describe_model(spec_of(tmp_path, "lm", smollm2_dir))
    assert info["quantization"] == {"bits": stored["bits"], "group_size": stored["group_size"]}
    assert info["quantization"]["bits"] == 4


def test_smollm2_is_a_llama_with_its_configured_context(tmp_path: Path, smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text(encoding="utf-8"))
    info = describe_model(spec_of(tmp_path, "lm", smollm2_dir))
    assert info["family"] == "llama"
    assert info["context_length"] == config["max_position_embeddings"]
    assert info["size_on_disk_bytes"] == walked_size(smollm2_dir)


def test_quantize_bits_without_a_stored_quantization_is_reported_as_on_load(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    info = describe_model(spec_of(tmp_path, "lm", tiny_model_dir, quantize_bits=4))
    assert info["quantization"] == {"bits": 4, "group_size": None, "on_load": True}


def test_llava_family_and_context_come_from_its_text_config(
    tmp_path: Path, tiny_llava_dir: Path
) -> None:
    config = json.loads((tiny_llava_dir / "config.json").read_text(encoding="utf-8"))
    info = describe_model(spec_of(tmp_path, "vlm", tiny_llava_dir))
    assert info["family"] == "llava"
    assert info["context_length"] == config["text_config"]["max_position_embeddings"] == 512
    assert info["quantization"] is None and info["error"] is None
    assert info["size_on_disk_bytes"] == walked_size(tiny_llava_dir)


def test_minilm_is_a_bert_with_its_position_limit(tmp_path: Path, minilm: Path) -> None:
    info = describe_model(spec_of(tmp_path, "embeddings", minilm))
    assert (info["family"], info["context_length"], info["quantization"]) == ("bert", 512, None)
    assert info["error"] is None
    assert info["size_on_disk_bytes"] == walked_size(minilm)


def test_whisper_context_is_its_text_context(tmp_path: Path, whisper_dir: Path) -> None:
    config = json.loads((whisper_dir / "config.json").read_text(encoding="utf-8"))
    info = describe_model(spec_of(tmp_path, "whisper", whisper_dir))
    assert info["family"] == "whisper"
    assert info["context_length"] == config["n_text_ctx"] == 448
    assert info["quantization"] is None and info["error"] is None
    assert info["size_on_disk_bytes"] == walked_size(whisper_dir)


def test_image_model_family_is_the_mflux_family_and_has_no_context(tmp_path: Path) -> None:
    folder = tmp_path / "my-image-model"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    transformer = {"_class_name": "FluxTransformer2DModel", "guidance_embeds": False}
    (folder / "transformer" / "config.json").write_text(json.dumps(transformer))
    info = describe_model(spec_of(tmp_path, "image-generation", folder))
    assert (info["family"], info["context_length"], info["error"]) == ("flux1-schnell", None, None)


def test_mflux_saved_image_model_reports_its_stored_bit_width(tmp_path: Path) -> None:
    folder = tmp_path / "FLUX.1-schnell-mflux-4bit"
    (folder / "transformer").mkdir(parents=True)
    index = {"metadata": {"quantization_level": "4"}, "weight_map": {}}
    (folder / "transformer" / "model.safetensors.index.json").write_text(json.dumps(index))
    info = describe_model(spec_of(tmp_path, "image-edit", folder, quantize_bits=8))
    assert info["family"] == "flux1-schnell"
    assert info["quantization"] == {"bits": 4, "group_size": None}


def test_image_folder_of_unknown_family_sets_error(tmp_path: Path) -> None:
    folder = tmp_path / "my-finetune"
    folder.mkdir()
    info = describe_model(spec_of(tmp_path, "image-generation", folder))
    assert info["family"] is None and "family" in info["error"]


# ----- broken folders -----------------------------------------------------------------------


def test_missing_folder_sets_error_and_no_size(tmp_path: Path, tiny_model_dir: Path) -> None:
    spec = spec_of(tmp_path, "lm", llama_copy(tiny_model_dir, tmp_path / "gone"))
    shutil.rmtree(tmp_path / "gone")
    info = describe_model(spec)
    assert "does not exist" in info["error"]
    assert info["size_on_disk_bytes"] is None and info["family"] is None
    assert info["id"] == "m" and info["path"] == str(tmp_path / "gone")


def test_unresolved_hub_entry_sets_error() -> None:
    info = describe_model(ModelSpec(id="q", kind=ModelKind.LM, hub="org/absent"))
    assert info["hub"] == "org/absent" and info["path"] is None
    assert info["error"] and info["size_on_disk_bytes"] is None


def test_invalid_json_config_sets_error_and_keeps_the_size(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    folder = llama_copy(tiny_model_dir, tmp_path / "bad-json")
    (folder / "config.json").write_text('{"model_type": "llama",', encoding="utf-8")
    info = describe_model(spec_of(tmp_path, "lm", folder))
    assert "not valid JSON" in info["error"]
    assert info["family"] is None and info["size_on_disk_bytes"] == walked_size(folder)


def test_config_that_is_not_an_object_sets_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = llama_copy(tiny_model_dir, tmp_path / "list-json")
    (folder / "config.json").write_text("[1, 2]", encoding="utf-8")
    assert "JSON object" in describe_model(spec_of(tmp_path, "lm", folder))["error"]


def test_deeply_nested_config_sets_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = llama_copy(tiny_model_dir, tmp_path / "deep-json")
    (folder / "config.json").write_text("[" * 200_000, encoding="utf-8")
    assert "not valid JSON" in describe_model(spec_of(tmp_path, "lm", folder))["error"]


def test_oversize_config_is_not_parsed(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = llama_copy(tiny_model_dir, tmp_path / "big-json")
    big = {"model_type": "llama", "padding": "x" * MAX_CONFIG_BYTES}
    (folder / "config.json").write_text(json.dumps(big), encoding="utf-8")
    info = describe_model(spec_of(tmp_path, "vlm", folder))
    assert "over 1 MiB" in info["error"]
    assert info["family"] is None


def test_missing_config_sets_error(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    info = describe_model(spec_of(tmp_path, "embeddings", folder))
    assert "config.json not found" in info["error"] and info["size_on_disk_bytes"] == 0


def test_config_that_is_a_fifo_is_not_opened_for_a_blocking_read(tmp_path: Path) -> None:
    folder = tmp_path / "fifo"
    folder.mkdir()
    os.mkfifo(folder / "config.json")
    assert "not a regular file" in describe_model(spec_of(tmp_path, "lm", folder))["error"]


# ----- size on disk ---------------------------------------------------------------------------


def test_links_out_of_the_folder_are_not_counted(tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x" * 1000)
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    (folder / "weights.bin").symlink_to(outside)
    (folder / "linked-dir").symlink_to(tmp_path, target_is_directory=True)
    info = describe_model(spec_of(tmp_path, "lm", folder))
    assert info["size_on_disk_bytes"] == len('{"model_type": "llama"}')


def test_a_file_linked_twice_inside_the_folder_is_counted_once(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    (folder / "real.bin").write_bytes(b"y" * 500)
    (folder / "alias.bin").symlink_to(folder / "real.bin")
    os.link(folder / "real.bin", folder / "hard.bin")
    assert describe_model(spec_of(tmp_path, "lm", folder))["size_on_disk_bytes"] == 502


def test_hugging_face_cache_snapshot_counts_its_blobs(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    blobs = {"config.json": b'{"model_type": "llama", "n_positions": 64}', "model.bin": b"z" * 700}
    for name, data in blobs.items():
        (repo / "blobs" / f"sha-{name}").write_bytes(data)
        (snapshot / name).symlink_to(Path("../../blobs") / f"sha-{name}")
    info = describe_model(spec_of(tmp_path, "lm", snapshot))
    assert info["size_on_disk_bytes"] == sum(len(d) for d in blobs.values())
    assert (info["family"], info["context_length"]) == ("llama", 64)


# ----- the catalog ----------------------------------------------------------------------------


def test_describe_catalog_lists_every_entry_sorted_by_id(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    catalog = write_catalog(
        tmp_path / "models.toml",
        {
            "zeta": {"kind": "lm", "path": tiny_model_dir},
            "alpha": {"kind": "lm", "path": tiny_model_dir, "quantize_bits": 8},
            "mid": {"kind": "embeddings", "path": tiny_model_dir},
        },
    )
    described = describe_catalog(Catalog.load(catalog))
    assert [d["id"] for d in described] == ["alpha", "mid", "zeta"]
    assert [d["kind"] for d in described] == ["lm", "embeddings", "lm"]
