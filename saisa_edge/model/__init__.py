"""The PyTorch reference: plain modules named as the checkpoint names its tensors.

`clip` encodes the image, `llama` holds the decoder with its per-layer projectors,
`original` is the public SAISA code's full-sequence formulation and `split` the
deployable one (visual K/V once per image, then text-only prefill and decode).
"""
