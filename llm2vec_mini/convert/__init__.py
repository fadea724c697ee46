"""Readers (and a writer) for the checkpoint formats llm2vec-mini loads without transformers.

safetensors.py  the safetensors container (reader and writer)
torch_bin.py    PyTorch `.bin` pickles, loaded with weights_only=True and nothing looser
gguf.py         llama.cpp's GGUF: metadata, tensor infos, dequantisers, Llama mapping
gguf_tokenizer.py  a `tokenizers.Tokenizer` built from GGUF vocabulary metadata
hf.py           Hugging Face model directories -> (LlamaForCausalLM, Tokenizer)
peft.py         PEFT LoRA adapter directories, merged into a model
checks.py       before a model is built: its config against the tensors a file holds
"""
