"""The simulated model's shape: KV block size and KV bytes, which the KV pool, the NIXL pull and
LMCache's chunks are all measured in. Imports nothing of the package."""

BLOCK_SIZE = 16
# KV bytes per token of Llama-3.1-8B in bf16: 32 layers x (K, V) x 8 KV heads x 128 x 2 bytes;
# a pull moves one descriptor per block, layer and K/V, as vLLM's NixlConnector does
KV_BYTES_PER_TOKEN = 131072
KV_DESCRIPTORS_PER_BLOCK = 64
