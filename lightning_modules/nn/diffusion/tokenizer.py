"""The CLIP BPE tokenizer built from the vocabulary that ships inside `open_clip_torch`, so the `tiny`
preset and the CLIP scorer tokenise exactly like SD's text encoder without a download."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import tempfile

from cli.errors import ConfigError

# The vocabulary is fixed by the BPE file: 256 bytes, their 256 end-of-word forms, 48,894 merges,
# then <|startoftext|> and <|endoftext|> (49,408 entries; OpenAI CLIP's vocabulary).
NUM_MERGES = 49152 - 256 - 2

#: what a CLIP text model needs to match this tokenizer (the tiny presets' text towers use it)
CLIP_TEXT_VOCAB = dict(
    vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407
)


def _bpe_file() -> str:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the tiny diffusion preset needs the CLIP BPE vocabulary from open_clip_torch: "
            "run `make install EXTRAS=dev,classification,diffusion`"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.exists(path):
        raise ConfigError(f"{path} is missing: reinstall open_clip_torch")
    return path


@functools.lru_cache(maxsize=1)
def _byte_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which CLIP's BPE is written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@functools.lru_cache(maxsize=1)
def clip_bpe_texts() -> tuple[str, str]:
    """The contents of vocab.json and merges.txt in the format `transformers.CLIPTokenizer` reads, made once
    per process from open_clip's BPE file."""
    with gzip.open(_bpe_file(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : NUM_MERGES + 1]
    pairs = [tuple(m.split()) for m in merges]
    chars = list(_byte_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(p) for p in pairs] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_json = json.dumps({tok: i for i, tok in enumerate(vocab)})
    return vocab_json, "#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n"


def clip_tokenizer(max_length: int = 77):
    """A `transformers.CLIPTokenizer` with OpenAI CLIP's vocabulary (49,408 tokens), padding with <|endoftext|>.

    The tokenizer reads its two files once, when it is built, and keeps them in memory (`save_pretrained`
    writes from there), so they live in a temporary folder only for that moment: 1.5 MB per process used to
    stay behind in the temp dir."""
    from transformers import CLIPTokenizer

    vocab_json, merges_txt = clip_bpe_texts()
    with tempfile.TemporaryDirectory(prefix="clip-bpe-") as folder:
        vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        with open(vocab, "w", encoding="utf-8") as f:
            f.write(vocab_json)
        with open(merges, "w", encoding="utf-8") as f:
            f.write(merges_txt)
        return CLIPTokenizer(vocab, merges, model_max_length=max_length, pad_token="<|endoftext|>")
