"""Writing a harvest's rows: the LM (or the synthetic generator) run over a writer's sequences, batch by batch."""
from __future__ import annotations

import queue
import threading
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..cache.format import to_storage
from ..cache.writer import CacheWriter
from ..config import ConfigError, HarvestConfig
from ..models import Capture, load_model
from .plan import Plan
from .synthetic import generate
from .tokens import DatasetExhausted, batches, contexts


def exhausted_error(cfg: HarvestConfig, e: DatasetExhausted, n_tokens: int, then: str) -> ConfigError:
    """The one line for a dataset shorter than ``--tokens``."""
    return ConfigError(f"tokens: {cfg.dataset!r} ran out after {e.sequences * cfg.context_size:,} tokens "
                       f"({e.sequences} contexts) but --tokens asks for {n_tokens:,}; lower --tokens{then}")


def _prefetch(it, depth: int = 2):
    """Tokenize ahead of the LM in a background thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def fill() -> None:
        try:
            for item in it:
                q.put(item)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    threading.Thread(target=fill, daemon=True, name="tokenize").start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def write_rows(cfg: HarvestConfig, p: Plan, writer: CacheWriter, progress: bool, desc: str = "") -> None:
    """Run the LM over the writer's sequences (all of them, a shard's range, or a repair's blocks) and write them."""
    if cfg.source == "synthetic":
        return generate(cfg, writer, progress, desc)
    manifest, info, tokenizer = p.manifest, p.info, p.tokenizer
    ctx = cfg.context_size
    start_seq, first_seq = writer.start_row // ctx, writer.first * manifest["storage"]["seqs_per_chunk"]
    n_seqs = writer.end_row // ctx
    device = torch.device(cfg.device) if cfg.device else None
    if device is not None and device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # else pinned buffers and events open a context on GPU 0 too
    model = load_model(info, dtype=cfg.model_dtype, device=cfg.device, device_map=cfg.device_map, tokenizer=tokenizer,
                       progress=progress, attn_implementation=manifest["model"]["attn_implementation"])
    names = {(a["layer"], a["site"]): n for n, a in manifest["arrays"].items()}
    capture = Capture(model, info.arch, list(names), transform=lambda t: to_storage(t, cfg.dtype))
    bar = tqdm(total=(n_seqs - first_seq) * ctx, initial=(start_seq - first_seq) * ctx, unit="tok", unit_scale=True,
               disable=not progress, desc=f"harvest {Path(cfg.model).name}{desc}", dynamic_ncols=True)
    try:
        for _, ids in _prefetch(batches(contexts(cfg, tokenizer, p.documents), start_seq, n_seqs, cfg.batch_size)):
            acts = capture(torch.from_numpy(ids))
            writer.write(torch.from_numpy(ids), {names[k]: v for k, v in acts.items()})
            s = writer.stats
            bar.update(ids.size)
            bar.set_postfix_str(f"{s.stored_bytes / 1e9:.2f} GB written, ratio {s.raw_bytes / s.stored_bytes:.2f}"
                                if s.stored_bytes else  # object stores are not asked each chunk's size
                                f"{s.raw_bytes / 1e9:.2f} GB raw written", refresh=False)
        writer.finish()
    finally:
        capture.close()
        bar.close()
