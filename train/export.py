"""Export a training checkpoint as a standard Hugging Face model directory.

    python train/export.py --checkpoint runs/tiny/ckpt-00000004 --output exported/tiny
    python train/export.py --checkpoint runs/tiny --output exported/tiny     # the run's newest valid checkpoint

OUTPUT gets what `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` read: config.json,
model.safetensors (sharded if large), generation_config.json, the tokenizer files, and README.md, a short model
card holding the training config (`push_to_hub`-ready). `train/evaluate.py --model OUTPUT` evaluates it.

The checkpoint's config.yaml names the model the run started from; that model is rebuilt (architecture,
tokenizer), the checkpoint's weights are copied in, and the result is written with `save_pretrained` into a
temporary directory, reloaded and compared tensor by tensor before it is renamed to OUTPUT.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as a script: train/ must not shadow libraries (its evaluate.py vs HF `evaluate`)
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import argparse
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mamlen.train import checkpoint, config, models


class ExportError(RuntimeError):
    """The checkpoint cannot be exported; the message names the path and what is wrong."""


@dataclass
class Exported:
    path: Path
    step: int
    model: str


def find_checkpoint(path: str | Path) -> checkpoint.Checkpoint:
    """A ckpt-XXXXXXXX directory (verified against its manifest), or the newest valid one of a run directory."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"--checkpoint {path}: no such directory")
    if (path / checkpoint.MANIFEST).exists() or (path / checkpoint.MODEL).exists():
        try:
            checkpoint.verify(path)
        except checkpoint.CheckpointError as e:
            raise ExportError(str(e)) from None
        state = json.loads((path / checkpoint.STATE).read_text())
        return checkpoint.Checkpoint(path=path, step=int(state["step"]), state=state)
    ck = checkpoint.latest(path, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    if ck is None:
        raise ExportError(f"--checkpoint {path}: neither a checkpoint (no {checkpoint.MANIFEST}) nor a run "
                          f"directory with a valid ckpt-XXXXXXXX/ in it")
    return ck


def model_card(cfg: config.Config, ck: checkpoint.Checkpoint) -> str:
    """README.md: Hugging Face metadata (YAML front matter) and the training config."""
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["mamlen", cfg.train.method, "meta-learning", "in-context-learning"]}
    if cfg.model.name not in (*models.TINY, "smollm2") and not Path(cfg.model.name).exists():
        meta["base_model"] = cfg.model.name  # a hub id
    method = ("MAML-en-LLM (second-order meta-training, Sinha et al., KDD 2024)" if cfg.train.method == "maml-en-llm"
              else "MetaICL multi-task fine-tuning (Min et al., NAACL 2022)")
    return (f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n"
            f"# {cfg.model.name}, meta-trained with mamlen\n\n"
            f"{method} of `{cfg.model.name}` on the `{cfg.data.setting}` setting's training tasks "
            f"({cfg.data.data_dir or 'the task suite shipped with mamlen'}), {ck.step} steps of "
            f"{cfg.train.tasks_per_step} tasks. Exported from `{ck.path.name}` by `train/export.py`.\n\n"
            f"Prompt format (MetaICL, {cfg.data.method}): k demonstrations `input\\noutput` joined by "
            f"`\\n\\n\\n`, then the query `input\\n`; each option is scored by its mean token loss.\n\n"
            f"## Training config\n\n```yaml\n{config.to_yaml(cfg)}```\n")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, where: Path) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if pa.keys() != pb.keys():
        raise ExportError(f"{where}: reloaded parameters differ in names: {sorted(set(pa) ^ set(pb))[:5]}")
    for n, t in pa.items():
        if t.dtype != pb[n].dtype or not torch.equal(t, pb[n]):
            raise ExportError(f"{where}: reloaded parameter {n} differs from the checkpoint's")


def export(checkpoint_path: str | Path, output: str | Path, *, overwrite: bool = False) -> Exported:
    """Write the checkpoint as an HF model directory at `output` (atomically: complete or absent)."""
    ck = find_checkpoint(checkpoint_path)
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--output {out}: exists and is not empty (pass --overwrite to replace it)")
    try:
        cfg = config.Config.from_dict(yaml.safe_load(ck.config_yaml()) or {})
    except config.ConfigError as e:
        raise ExportError(f"{ck.path / checkpoint.CONFIG}: {e}") from None
    dtype = getattr(torch, cfg.model.dtype)
    try:
        base, tok = models.load_model(cfg.model.name, dtype=dtype)
    except models.UnknownModelError as e:
        raise ExportError(f"{ck.path / checkpoint.CONFIG}: model.name: {e}") from None
    # a plain model of the same architecture: whatever loaded the base (a GGUF file, a custom attention set by
    # the engine) must not leak into the exported directory
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(base.config, dtype=dtype)
    model.generation_config = base.generation_config
    del base
    try:
        ck.load_model_(model)
    except checkpoint.CheckpointError as e:
        raise ExportError(str(e)) from None
    model.eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp)  # config.json, model.safetensors, generation_config.json
        tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(cfg, ck), encoding="utf-8")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype)
        _same_weights(model, reloaded, tmp)
        del reloaded
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Exported(path=out, step=ck.step, model=cfg.model.name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="train/export.py", description=__doc__.split("\n")[0],
                                epilog="Load it with AutoModelForCausalLM.from_pretrained(OUTPUT), or evaluate it "
                                       "with train/evaluate.py --model OUTPUT.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a ckpt-XXXXXXXX directory, or a run's output_dir (its newest valid checkpoint)")
    p.add_argument("--output", required=True, metavar="OUT", help="the HF model directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    try:
        done = export(args.checkpoint, args.output, overwrite=args.overwrite)
    except ExportError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {done.path}: {done.model} after {done.step} steps; "
          f"load with AutoModelForCausalLM.from_pretrained({str(done.path)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
