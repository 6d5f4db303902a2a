"""Hub ids resolve through huggingface_hub's snapshot_download; local paths never touch it."""


from sdxl_core import SDXLPipeline
from sdxl_core.loading import load_components
from sdxl_core.loading.hub import model_folder


def test_a_hub_id_loads_from_its_snapshot(fake_hub, tiny_model_dir):
    components = load_components("stabilityai/stable-diffusion-xl-base-1.0")
    assert components.unet.config == load_components(tiny_model_dir / "base").unet.config
    assert [repo_id for repo_id, _ in fake_hub] == ["stabilityai/stable-diffusion-xl-base-1.0"]


def test_a_variant_fetches_only_its_weight_files(fake_hub):
    model_folder("stabilityai/stable-diffusion-xl-base-1.0", variant="fp16")
    (_, kwargs), = fake_hub
    assert kwargs["allow_patterns"] == ["*.json", "*.txt", "*/*.fp16.safetensors"]


def test_without_a_variant_fp16_files_are_not_fetched(fake_hub):
    SDXLPipeline.from_pretrained("org/model", add_watermarker=False)
    (_, kwargs), = fake_hub
    assert "*/*.safetensors" in kwargs["allow_patterns"] and "*.fp16.safetensors" in kwargs["ignore_patterns"]


def test_existing_paths_and_non_ids_stay_local(fake_hub, tiny_model_dir, tmp_path):
    assert model_folder(tiny_model_dir / "base") == tiny_model_dir / "base"
    assert model_folder(str(tmp_path / "missing" / "deep" / "folder")) == tmp_path / "missing" / "deep" / "folder"
    assert fake_hub == []
