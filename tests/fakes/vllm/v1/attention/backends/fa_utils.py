"""Fake ``vllm.v1.attention.backends.fa_utils``: the FA version vLLM would pick (3 on Hopper)."""
FA_VERSION = 3


def get_flash_attn_version(requires_alibi: bool = False, head_size=None):
    return FA_VERSION
