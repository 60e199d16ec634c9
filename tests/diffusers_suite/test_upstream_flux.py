"""Diffusers' `FluxPipeline` fast tests, on `ScoreFusionFluxPipeline` (see upstream.py)."""

from upstream import derive

from diffusers_scorefusion import ScoreFusionFluxPipeline

derive(
    globals(),
    "pipelines.flux.test_pipeline_flux",
    [
        "TestFluxPipeline",
        "TestFluxPipelineIPAdapter",
        "TestFluxPipelineMemory",
        "TestFluxPipelinePyramidAttentionBroadcast",
        "TestFluxPipelineFasterCache",
        "TestFluxPipelineFirstBlockCache",
        "TestFluxPipelineTaylorSeerCache",
        "TestFluxPipelineMagCache",
        "TestFluxPipelineLoRA",
        "TestFluxPipelineLoRAMemory",
    ],
    ScoreFusionFluxPipeline,
    denoiser_key="transformer",
)
