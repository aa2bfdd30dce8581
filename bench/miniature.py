"""The miniature teacher for Table A: a small full-precision Llama trained here, on the default
corpus's training split, with its own byte-level BPE tokenizer, so the whole recipe (stage 1
conversion at the same depth, stage 2 continued pre-training, stage 3 distillation) fits this machine.

The teacher must be well beyond what the student reaches on its own within its budget, or there is
nothing to distil: trained on 1.5M tokens (367 steps) it scored 5.06 nats/token on held-out text,
worse than its own ternary conversion after 0.56M tokens of stage 2 (4.91). It now trains on 6M
tokens (about 3 passes over the 1M-token-per-source training split).

Built once and cached under `<data.cache_dir>/miniature/<key>/` (safetensors, tokenizer,
`trained.json` with the loss curve), so later runs reuse it. The key covers what decides the teacher:
its settings, the sources and splits, and the code that reads and cuts the rows (a change there,
such as ending every document with EOS, once made a teacher of other rows under the same key).
Held-out and probe documents are never seen: the tokenizer is trained on training documents and the
teacher on the corpus's training rows.
"""

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

SETTINGS = {"vocab_size": 4096, "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "seq_len": 256, "train_tokens": 6_000_000,
            "batch_size": 16, "lr": 3e-3, "warmup_steps": 30, "seed": 0, "max_tokens_per_source": 1_000_000}


def miniature_dir(data) -> Path:
    """The cache folder for `data` (the run's `DataConfig`)."""
    import inspect

    from distillation.data import packing, rows, sources

    key = {"settings": SETTINGS, "sources": [[s.name, s.kind, s.path] for s in data.sources],
           "splits": [data.heldout_fraction, data.probe_fraction, data.seq_len],
           "code": [hashlib.sha256(inspect.getsource(m).encode()).hexdigest() for m in (sources, rows, packing)]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(data.cache_dir).expanduser() / "miniature" / digest


def _train_tokenizer(cfg, out: Path):
    """Byte-level BPE on the training documents of every source (never held-out or probe text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from distillation.data.sources import load_documents, split_of

    d = cfg.data
    texts = [doc.text for s in d.sources
             for doc in load_documents(s.name, s.kind, s.path, d.cache_dir, SETTINGS["max_tokens_per_source"])
             if split_of(f"{s.name}/{doc.doc_id}", d.heldout_fraction, d.probe_fraction) == "train"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=SETTINGS["vocab_size"], special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


def _training_rows(cfg, out: Path, tokenizer):
    """Every training row of the sources' first units (the teacher's budget), cut as a run cuts them."""
    from distillation.data.corpus import open_sources, row_recipe

    recipe = row_recipe(cfg.data, str(out))
    parts = [recipe.cut(spec, unit)["train"] for spec in open_sources(cfg.data).values() for unit in spec.units]
    return np.concatenate([p.rows for p in parts]), np.concatenate([p.lengths for p in parts])


def build_miniature_teacher(cfg, say=print) -> Path:
    """The cached teacher folder, trained now if it is not there yet. `cfg`: the run's config (its
    data sources and splits); Ray must be up (the corpus is tokenized with Ray Data)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from distillation.data.packing import next_token_labels

    out = miniature_dir(cfg.data)
    if (out / "trained.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tokenizer = _train_tokenizer(cfg, out)
    torch.manual_seed(SETTINGS["seed"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=SETTINGS["hidden_size"],
                         intermediate_size=SETTINGS["intermediate_size"],
                         num_hidden_layers=SETTINGS["num_hidden_layers"],
                         num_attention_heads=SETTINGS["num_attention_heads"],
                         num_key_value_heads=SETTINGS["num_key_value_heads"], max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)  # config + initial weights, so the corpus can be tokenized from `out`
    rows, lengths = _training_rows(cfg, out, tokenizer)
    batch = SETTINGS["batch_size"]
    steps = math.ceil(SETTINGS["train_tokens"] / (batch * SETTINGS["seq_len"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=SETTINGS["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    warm = SETTINGS["warmup_steps"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    rng = np.random.default_rng(SETTINGS["seed"])
    order = np.concatenate([rng.permutation(len(rows)) for _ in range(math.ceil(steps * batch / len(rows)) + 1)])
    model.train()
    curve = []
    for step in range(steps):
        pick = order[step * batch:(step + 1) * batch]
        ids = torch.as_tensor(rows[pick], dtype=torch.long)
        labels = next_token_labels(ids, torch.as_tensor(lengths[pick]))
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits.flatten(0, 1), labels.flatten(),
                                                 ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps - 1:
            curve.append((step, loss.item()))
            say(f"miniature teacher step {step}/{steps}: loss {loss.item():.3f}")
    model.save_pretrained(out)
    (out / "trained.json").write_text(json.dumps({"settings": SETTINGS, "steps": steps, "curve": curve,
                                                  "train_rows": len(rows), "wall_s": time.time() - started}))
    return out
