"""Where generation runs: in this process (`engine: local`, the default) or on a Ray
cluster (`engine: ray`). The config section is `datagen.engines.config.EngineConfig`; the
Ray pipeline is `datagen.engines.ray_generate` (imports Ray only when a run uses it).
"""
