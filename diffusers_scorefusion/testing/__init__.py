"""Tiny seeded components built in code, offline, for tests, examples and benchmarks: UNet pipelines (SD, SDXL) in
`unet_parts`, transformer pipelines (SD3, Flux, Chroma, PixArt-Sigma, Sana) in `transformer_parts`."""
