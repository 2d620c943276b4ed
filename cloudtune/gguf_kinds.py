"""What `outputs.gguf` and `cloudtune export --gguf` accept, apart from the recipe's models so the CLI's
start imports no pydantic."""

# the merged model in f16 or q8_0, or the LoRA adapter alone (llama.cpp's --lora file)
GGUF_KINDS = ("f16", "q8_0", "lora")
GGUF_ADAPTER = "lora"
