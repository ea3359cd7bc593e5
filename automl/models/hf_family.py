"""Hugging Face transformers text encoders with our own pooled classification head.

The pooling is read from the checkpoint: a sentence-transformers model
(`1_Pooling/config.json`, e.g. all-MiniLM-L6-v2) was trained with mean
pooling, so mean pooling it is; any other checkpoint uses the first token.
The same pooling serves training, head-only feature caching, LogME and export.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from automl.data.encoders import TextEncoder, in_order, inference_batches
from automl.models.base import Family, Ragged, Split, eval_mode
from automl.models.registry import BackboneSpec, offline_hint, register_family

POOLING_FILE = "automl_pooling.json"


def read_pooling(model_dir: str) -> str:
    """'mean' for sentence-transformers checkpoints trained with mean pooling, else 'cls'."""
    d = Path(model_dir)
    for f in (d / POOLING_FILE, d / "1_Pooling" / "config.json"):
        if f.exists():
            cfg = json.loads(f.read_text())
            if "pooling" in cfg:
                return cfg["pooling"]
            return "mean" if cfg.get("pooling_mode_mean_tokens") else "cls"
    return "cls"


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    if how == "mean":  # sentence-transformers' definition: average of the unmasked token embeddings
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return hidden[:, 0]


class TextClassifier(nn.Module):
    """(input_ids, attention_mask) -> logits: a transformers encoder, pooling, dropout, a linear head."""

    family = "hf"

    def __init__(self, encoder: nn.Module, num_classes: int, pooling: str = "cls", dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pooled(input_ids, attention_mask)))


def _layers(encoder: nn.Module) -> nn.ModuleList | None:
    lists = [m for m in encoder.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len) if lists else None


class _Head(Split):
    """Pooled output of the frozen encoder; dropout + head train on it."""

    def bottom(self, encoder, x, idx, device):
        ids, mask = encoder.batch(x, idx)
        return self.model.pooled(ids.to(device), mask.to(device))

    def apply_top(self, feats, mask=None, training: bool = True):
        return self.model.head(self.model.dropout(feats))


class _Stop(Exception):
    pass


class _Prefix(Split):
    """The hidden states entering the first trainable encoder layer (ragged: one row per token)."""

    def __init__(self, model: TextClassifier, layers: nn.ModuleList, cut: int):
        super().__init__(model)
        self.layers, self.cut, self.tag = layers, cut, f"hf{cut}"

    def features(self, encoder, x, device, batch_size: int = 128) -> Ragged:
        caught = []

        def grab(_module, args, kwargs):
            caught.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop  # the layers above are not needed

        handle = self.layers[self.cut].register_forward_pre_hook(grab, with_kwargs=True)
        rows: list = [None] * len(x)
        try:
            with torch.no_grad():
                for idx in inference_batches(x, batch_size)[0]:
                    ids, mask = encoder.batch(x, idx)
                    try:
                        self.model.encoder(input_ids=ids.to(device), attention_mask=mask.to(device))
                    except _Stop:
                        pass
                    h = caught.pop().float().cpu()
                    for i, n in enumerate(mask.sum(1).tolist()):
                        rows[idx[i]] = h[i, :n]
        finally:
            handle.remove()
        offsets = torch.as_tensor(np.concatenate([[0], np.cumsum([len(r) for r in rows])]), dtype=torch.long)
        return Ragged(torch.cat(rows), offsets)

    def apply_top(self, feats, mask=None, training: bool = True):
        from transformers.masking_utils import create_bidirectional_mask

        model = self.model
        mask4 = create_bidirectional_mask(config=model.encoder.config, inputs_embeds=feats, attention_mask=mask)
        for layer in self.layers[self.cut:]:
            out = layer(feats, mask4)
            feats = out[0] if isinstance(out, tuple) else out
        return model.head(model.dropout(pool(feats, mask, model.pooling)))


HF_EPS = 1e-4  # the pooler's scale when hf/ carries a first-token head through BERT's dense + tanh pooler


def _sequence_classifier(model: "TextClassifier", cfg, example) -> tuple:
    """(a transformers *ForSequenceClassification computing `model`'s logits, max abs diff, None), or
    (None, None, why not)."""
    from transformers import AutoModelForSequenceClassification

    if model.pooling != "cls":
        return None, None, (f"{model.pooling} pooling: a transformers sequence classifier reads the first token "
                            "only, so it cannot compute this model's logits")
    try:
        clf = AutoModelForSequenceClassification.from_config(cfg).eval()
    except (ValueError, KeyError) as exc:
        return None, None, f"no sequence classifier for this architecture ({exc})"
    base = getattr(clf, clf.base_model_prefix, None)
    if base is None:
        return None, None, "the sequence classifier has no base model to load the encoder into"
    missing, unexpected = base.load_state_dict(model.encoder.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        return None, None, f"the encoder's weights do not fit the sequence classifier ({(unexpected or missing)[:3]})"
    head, eps = model.head, HF_EPS
    pooler_dense = getattr(getattr(base, "pooler", None), "dense", None)
    classifier = getattr(clf, "classifier", None)
    if isinstance(pooler_dense, nn.Linear) and isinstance(classifier, nn.Linear):            # BERT and kin
        dense, out = pooler_dense, classifier
    elif isinstance(getattr(classifier, "dense", None), nn.Linear) and isinstance(
            getattr(classifier, "out_proj", None), nn.Linear):                                  # RoBERTa and kin
        dense, out = classifier.dense, classifier.out_proj
    else:
        return None, None, f"{type(clf).__name__}'s head is not a dense + tanh pooler and a linear classifier"
    with torch.no_grad():
        dense.weight.copy_(torch.eye(dense.weight.shape[0], dtype=dense.weight.dtype) * eps)
        dense.bias.zero_()
        out.weight.copy_(head.weight / eps)
        out.bias.copy_(head.bias)
        ref = model.eval()(*example)
        got = clf(input_ids=example[0], attention_mask=example[1]).logits
    diff = float((got - ref).abs().max())
    if not diff <= 1e-3 * max(1.0, float(ref.abs().max())):
        return None, None, f"the sequence classifier's logits differ from this model's by {diff:.3g}"
    return clf, diff, None


def _hf_readme(info: dict, labels: list[str], regression: bool, cfg, max_length) -> str:
    lines = ["# The fine-tuned model for Hugging Face transformers", "",
             "Written by automl next to its own export (load that with `automl.load(<export dir>)`).", ""]
    if info["loads_with"] == "AutoModelForSequenceClassification":
        lines += ["```python", "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
                  "model = AutoModelForSequenceClassification.from_pretrained('<export dir>/hf')",
                  "tokenizer = AutoTokenizer.from_pretrained('<export dir>/hf')", "```", "",
                  f"Tokenise with truncation=True, max_length={max_length}, as automl does. Its logits are the automl model's (max abs difference {info['max_abs_diff']:.1e} on a sample "
                  "batch). The automl head reads the first token's hidden state; a transformers classifier reads "
                  f"it through a dense + tanh layer, which is written as {HF_EPS:g} x identity, with the classifier "
                  f"scaled by "
                  f"1/{HF_EPS:g} to match: the same predictions, but not the usual starting point for more "
                  "fine-tuning in another framework."]
    else:
        lines += ["```python", "import torch", "from safetensors.torch import load_file",
                  "from transformers import AutoModel, AutoTokenizer",
                  "encoder = AutoModel.from_pretrained('<export dir>/hf')   # the fine-tuned encoder",
                  "tokenizer = AutoTokenizer.from_pretrained('<export dir>/hf')",
                  "w = load_file('<export dir>/model.safetensors')",
                  f"batch = tokenizer(texts, padding=True, truncation=True, max_length={max_length}, "
                  "return_tensors='pt')",
                  "hidden = encoder(**batch).last_hidden_state"]
        if info["pooling"] == "mean":
            lines += ["m = batch['attention_mask'].unsqueeze(-1).float()",
                      "pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)   # mean pooling"]
        else:
            lines += ["pooled = hidden[:, 0]   # the first token's hidden state"]
        lines += ["logits = pooled @ w['head.weight'].T + w['head.bias']", "```", "",
                  f"Not loadable as a sequence classifier: {info['why_not_sequence_classification']}. "
                  "`AutoModelForSequenceClassification.from_pretrained` on this folder gives a newly initialised "
                  "head (transformers warns that it is not trained)."]
    if regression:
        lines += ["", "Regression: the output is the standardised target; multiply by the std and add the mean "
                  f"in `automl_target_scale` of config.json ({cfg.automl_target_scale})."]
    else:
        lines += ["", f"Labels (config.json's id2label): {labels}."]
    return "\n".join(lines) + "\n"


_TOKENIZERS: dict[str, object] = {}


def load_tokenizer(model_dir: str):
    """A tokenizer, loaded once per process (reused Ray actors run many trials)."""
    if model_dir not in _TOKENIZERS:
        from transformers import AutoTokenizer

        try:
            _TOKENIZERS[model_dir] = AutoTokenizer.from_pretrained(model_dir)
        except OSError as exc:
            raise offline_hint(BackboneSpec("hf", model_dir), exc) from exc
    return _TOKENIZERS[model_dir]


class HFFamily(Family):
    library = "hf"
    named = True
    offline_fix = "download the model once and use 'hf/<local dir>'"
    modality = "text"
    input_names = ("input_ids", "attention_mask")

    def warm(self):
        from transformers import AutoConfig, AutoModel, AutoTokenizer  # noqa: F401

    def build(self, spec, num_classes, *, dropout=0.0, drop_path=0.0, pretrained=None):
        from transformers import AutoConfig, AutoModel

        use_pretrained = spec.pretrained if pretrained is None else pretrained
        # `pooling` in the spec overrides the checkpoint's own (the search's rung 0 tries each on frozen features).
        config_kwargs = {k: v for k, v in spec.kwargs.items() if k != "pooling"}
        try:
            cfg = AutoConfig.from_pretrained(spec.model, **config_kwargs)
            # The searched dropout applies inside the encoder too, so 0.0 really is no dropout.
            for attr in ("hidden_dropout_prob", "dropout"):
                if hasattr(cfg, attr) and isinstance(getattr(cfg, attr), float):
                    setattr(cfg, attr, float(dropout))
            if use_pretrained:
                encoder = AutoModel.from_pretrained(spec.model, config=cfg)
            else:
                encoder = AutoModel.from_config(cfg)
        except OSError as exc:
            raise offline_hint(spec, exc) from exc
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # we pool ourselves; an unused pooler would only carry dead weights
        return TextClassifier(encoder, num_classes, spec.kwargs.get("pooling") or read_pooling(spec.model),
                              float(dropout))

    def encoder(self, model, spec, config):
        return TextEncoder(load_tokenizer(spec.model), int(config["max_length"]))

    def pooling(self, spec):
        rest = json.dumps({k: v for k, v in spec.kwargs.items() if k != "pooling"}, sort_keys=True)
        return f"{spec.model}|{spec.weights}|{rest}", spec.kwargs.get("pooling") or read_pooling(spec.model)

    def pooled_features(self, model, encoder, x, device, poolings, batch_size: int = 128):
        out = {p: [] for p in poolings}
        batches, inverse = inference_batches(x, batch_size)
        with eval_mode(model), torch.no_grad():
            for idx in batches:
                ids, mask = encoder.batch(x, idx)
                ids, mask = ids.to(device), mask.to(device)
                hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
                for p in poolings:
                    out[p].append(pool(hidden, mask, p).float().cpu())
        return {p: in_order(v, inverse) for p, v in out.items()}

    def layer_groups(self, model):
        layers = _layers(model.encoder)
        prefix = next(f"encoder.{n}." for n, m in model.encoder.named_modules() if m is layers)
        emb, per_layer, head = [], [[] for _ in range(len(layers))], []
        for n, _ in model.named_parameters():
            if n.startswith(prefix):
                per_layer[int(n[len(prefix):].split(".")[0])].append(n)
            elif n.startswith("encoder.") and "embed" in n:
                emb.append(n)
            else:
                head.append(n)
        return [g for g in [emb, *per_layer, head] if g]

    def split(self, model, k, encoder, x, device):
        if k == 0:
            return _Head(model)
        layers = _layers(model.encoder)
        cut = next((i for i, m in enumerate(layers) if any(p.requires_grad for p in m.parameters())), len(layers))
        return _Prefix(model, layers, cut) if 0 < cut < len(layers) else None

    def head(self, model):
        return model.head

    def set_head(self, model, linear):
        model.head = linear

    def save_extra(self, model, encoder, out_dir):
        # The architecture (config) and tokenizer, so the export rebuilds offline without the original checkpoint.
        hf = Path(out_dir) / "hf"
        hf.mkdir(exist_ok=True)
        model.encoder.config.save_pretrained(str(hf))
        encoder.tokenizer.save_pretrained(str(hf))
        (hf / POOLING_FILE).write_text(json.dumps({"pooling": model.pooling}))

    def save_transformers(self, model, out_dir, manifest) -> dict:
        """The fine-tuned weights in hf/, written as `save_pretrained` writes them (model.safetensors, and a
        config with num_labels, id2label, label2id), so the export loads in plain transformers. Returns what was
        written, for the manifest's `exports["transformers"]`; hf/README.md says the same for a user.

        First-token ("cls") pooling: hf/ holds a *ForSequenceClassification whose logits are this model's
        (checked on a sample batch, like TorchScript and ONNX). Our head reads the first token's hidden state
        directly, where BERT's reads it through its pooler (dense + tanh), so the pooler is written as eps * I
        and the classifier as head / eps: tanh(eps * h) / eps = h to within (eps * h)^2 / 3, far below float32
        noise at eps = 1e-4. Mean pooling (sentence-transformers checkpoints such as all-MiniLM-L6-v2) has no
        *ForSequenceClassification equivalent: hf/ then holds the fine-tuned encoder (AutoModel loads it
        exactly) and the head is `head.weight` / `head.bias` in the export's model.safetensors; loading hf/
        with AutoModelForSequenceClassification gives a newly initialised head (transformers warns)."""
        import copy

        hf = Path(out_dir) / "hf"
        regression = manifest.is_regression
        labels = [str(c) for c in manifest.classes] if not regression else ["target"]
        cfg = copy.deepcopy(model.encoder.config)
        cfg.num_labels = len(labels)
        cfg.id2label = dict(enumerate(labels))
        cfg.label2id = {v: k for k, v in cfg.id2label.items()}
        cfg.problem_type = "regression" if regression else "single_label_classification"
        if regression:
            cfg.automl_target_scale = list(manifest.target_scale or [0.0, 1.0])
        clf, diff, reason = _sequence_classifier(model, cfg, self.example_inputs(None))
        if clf is not None:
            clf.save_pretrained(str(hf))
            info = {"dir": "hf", "loads_with": "AutoModelForSequenceClassification", "max_abs_diff": diff}
        else:
            own, model.encoder.config = model.encoder.config, cfg
            try:
                model.encoder.save_pretrained(str(hf))
            finally:
                model.encoder.config = own
            info = {"dir": "hf", "loads_with": "AutoModel", "head": "head.weight, head.bias in model.safetensors",
                    "pooling": model.pooling, "why_not_sequence_classification": reason}
        (hf / "README.md").write_text(_hf_readme(info, labels, regression, cfg,
                                                 getattr(manifest.preprocessing, "max_length", None)))
        return info

    def rebuild(self, export_dir, backbone, num_classes, hyperparameters):
        # An ensemble's members share hf/ (one tokenizer) but may pool differently: a member's own pooling wins.
        pooling = {"pooling": backbone.kwargs["pooling"]} if backbone.kwargs.get("pooling") else {}
        spec = BackboneSpec("hf", os.path.join(str(export_dir), "hf"), pretrained=False, kwargs=pooling)
        return self.build(spec, num_classes, dropout=float(hyperparameters.get("dropout") or 0.0), pretrained=False)

    def example_inputs(self, preprocessing):
        ids = torch.randint(5, 100, (2, 16), dtype=torch.long)  # ids every vocabulary has
        return ids, torch.ones_like(ids)


register_family(HFFamily())
