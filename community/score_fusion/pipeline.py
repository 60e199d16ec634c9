"""ScoreFusion as a Diffusers community pipeline (needs `pip install diffusers-scorefusion`).

    pipe = DiffusionPipeline.from_pretrained(
        BASE, custom_pipeline="path/to/community/score_fusion", trust_remote_code=True, unet=fused
    )

Publish this file as `pipeline.py` in a Hub repo to load it with `custom_pipeline="<repo id>"`. It only imports the
installed package: Diffusers needs exactly one pipeline class defined outside `diffusers` in this file.
"""

from diffusers_scorefusion.pipelines.pipeline_score_fusion import ScoreFusionPipeline  # noqa: F401
