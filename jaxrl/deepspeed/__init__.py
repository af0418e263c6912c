"""DeepSpeed, read into jaxrl: its JSON configs (`config`: keys -> jaxrl's optimizer, ZeRO stage,
precision and RunConfig overrides) and a DeepSpeed-style engine for any NNX model (`engine`:
`jaxrl.initialize`). Nothing else in jaxrl imports this package; it imports the rest.

Modules are imported on use, so reading a config does not import the engine's training machinery.
"""
