"""Planning a fine-tune before anything is rented: which GPU offers fit it, how long it takes, what it costs.

The trainer imports planning.memory on the GPU machine, so nothing here may import sky, torch or
transformers at module level; import the submodules by name.
"""
