"""ShapesWorld: a procedural world of coloured shapes with exact ground truth.

`world` renders scenes and writes their captions, `codec` is the exact latent codec,
`evaluator` reads attributes back from images, `train` holds the training recipes.
"""
