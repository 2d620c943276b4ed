"""The training side: runs on the GPU machine as `python -m cloudtune.train RECIPE --out DIR`.

The only package that imports torch, transformers, peft and bitsandbytes.
"""
