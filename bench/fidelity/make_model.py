"""Create the tiny random-weight Llama (conf/model/tiny-llama.yaml) + an exact word-level tokenizer.

Runs inside the vLLM venv (needs torch + transformers); no downloads. Token id i <-> word "w{i}",
so every prompt length the trace asks for is exact. Usage: python make_model.py --out DIR
"""
import argparse
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=1536)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-pos", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args()

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                      max_position_embeddings=a.max_pos, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False, rope_theta=10000.0)
    cfg.torch_dtype = a.dtype
    model = LlamaForCausalLM(cfg).to(getattr(torch, a.dtype))
    tmp = Path(a.out + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, a.vocab)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<unk>", model_max_length=a.max_pos)
    fast.save_pretrained(tmp)
    tmp.rename(a.out)  # a half-written model dir never looks finished
    n = sum(t.numel() for t in model.parameters())
    print(f"saved {a.out}: params={n / 1e6:.1f}M dtype={a.dtype}")


if __name__ == "__main__":
    main()
