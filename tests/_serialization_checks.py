"""Checks that both fusion classes' save tests share (FusedUNet in test_serialization_folders.py, FusedTransformer in
test_serialization_transformer.py)."""

import hashlib
import json
import os


def check_variant_round_trip(fused, fusion_class, member_class, same, folder, safe_serialization):
    """`save_pretrained(variant="fp16")` names member folders and weight files as Diffusers does, records their sha256,
    loads back with and without `variant=`, and leaves each member a standard `member_class` folder."""
    fused.save_pretrained(folder, variant="fp16", safe_serialization=safe_serialization)
    extension = "safetensors" if safe_serialization else "bin"
    weights_name = f"diffusion_pytorch_model.fp16.{extension}"
    member = folder / "member_0.fp16.diffusers"
    assert sorted(os.listdir(member)) == ["config.json", weights_name]
    config = json.loads((folder / "config.json").read_text())
    digest = hashlib.sha256((member / weights_name).read_bytes()).hexdigest()
    assert config["members"][0]["sha256"][weights_name] == digest
    for variant in ("fp16", None):
        assert same(fusion_class.from_pretrained(folder, variant=variant), fused)
    assert member_class.from_pretrained(member, variant="fp16") is not None  # a standard Diffusers folder
