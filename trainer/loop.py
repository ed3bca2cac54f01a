"""Set up a run (device, model, source, optimizer, schedule, resume) and train: the seed's loop, fed by a source.

`run_training` builds everything from the config sections and hands it to `train_loop`, the hot path, which
reads top to bottom: fetch micro-batches, forward under autocast, scaled backward, then the GradScaler
sequence (unscale, clip, step, update), the schedule, and on logging steps only, the one sync that turns
the device-side sums into a metrics record.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common.progress import log
from common.vocab import Vocabulary, load_tokenizer, resolve_model_dir
from trainer import StoppedEarly, TrainerError
from trainer.checkpoint import Checkpoints, restore_rng_state, rng_state, save_final
from trainer.cli import DeviceConfig, DistributedConfig, SourceConfig, TrainConfig, TrainerConfig
from trainer.evaluate import DEFAULT_MAX_SEQ_LEN, Evaluator, eval_batches, load_eval_index
from trainer.metrics import MetricsLog, progress_line
from trainer.model import load_model, load_tokenizer_for_saving, parameter_groups, pretraining_loss
from trainer.pregenerated import PregeneratedSource
from trainer.source import StopRequested, StreamSource

STATE_FORMAT = 1


@dataclass(frozen=True)
class Runtime:
    """The device and precision actually used (the flags, resolved against the machine)."""

    device: torch.device
    precision: str  # "fp16", "bf16" or "fp32"
    autocast_dtype: torch.dtype | None
    static_loss_scale: float | None  # fp16 with --loss_scale N; None = dynamic (or no scaler)

    @property
    def use_scaler(self) -> bool:
        return self.precision == "fp16"

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def resolve_runtime(config: DeviceConfig, distributed: DistributedConfig) -> Runtime:
    if torch.cuda.is_available() and not config.no_cuda:
        device = torch.device("cuda", max(distributed.local_rank, 0))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if config.fp16 and device.type != "cuda":
        # A seed command line run on a machine without a GPU (a dry run, CI) should still work.
        log.warning("--fp16 needs a CUDA GPU; training on the CPU in float32 instead")
        return Runtime(device, "fp32", None, None)
    if config.fp16:
        return Runtime(device, "fp16", torch.float16, config.loss_scale or None)
    if config.bf16:
        return Runtime(device, "bf16", torch.bfloat16, None)
    return Runtime(device, "fp32", None, None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def open_source(config: SourceConfig, train: TrainConfig, vocab: Vocabulary, max_positions: int,
                runtime: Runtime, stop: threading.Event):
    if config.pregenerated_data is not None:
        return PregeneratedSource(config.pregenerated_data, train.epochs, vocab, max_positions,
                                  train.micro_batch_size, train.seed, reduce_memory=config.reduce_memory,
                                  pin_memory=runtime.pin_memory)
    return StreamSource(config.bind, vocab.fingerprint(max_positions), max_positions, train.micro_batch_size,
                        pin_memory=runtime.pin_memory, prefetch_batches=config.prefetch_batches,
                        max_message_bytes=config.max_message_bytes, data_timeout_s=config.data_timeout_s,
                        stop=stop, curve=config.curve_keys())


def plan_steps(train: TrainConfig, source) -> int:
    """--max_steps, else the seed's count: the instances of all epochs over the total batch."""
    planned = source.planned_instances(train.epochs)
    if train.max_steps:
        if getattr(source, "finite", False) and train.max_steps * train.train_batch_size > planned:
            raise TrainerError(f"--max_steps {train.max_steps} needs {train.max_steps * train.train_batch_size} "
                               f"instances but --epochs {train.epochs} of the data give {planned}; raise --epochs "
                               "or lower --max_steps")
        return train.max_steps
    if planned is None:
        raise TrainerError("the producer does not announce how many instances an epoch has, so --epochs cannot "
                           "be turned into steps; pass --max_steps")
    steps = planned // train.train_batch_size
    if steps < 1:
        raise TrainerError(f"{train.epochs} epoch(s) give {planned} instances, less than one step of "
                           f"--train_batch_size {train.train_batch_size}")
    return steps


def build_optimizer(model, train: TrainConfig, total_steps: int, device: torch.device):
    """AdamW (fused on CUDA: with a GradScaler its step needs no sync) and linear warmup then linear decay."""
    optimizer = torch.optim.AdamW(parameter_groups(model, train.weight_decay), lr=train.learning_rate,
                                  fused=True if device.type == "cuda" else None)
    warmup = int(train.warmup_proportion * total_steps)

    def linear_warmup_then_decay(step: int) -> float:  # transformers' get_linear_schedule_with_warmup
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_then_decay)


def make_scaler(runtime: Runtime) -> torch.amp.GradScaler:
    """Dynamic scaling by default; a static --loss_scale is the same scaler reset to that value each update
    (steps whose gradients overflow are still skipped, but the scale never moves)."""
    init = runtime.static_loss_scale or 2.0**16
    return torch.amp.GradScaler(runtime.device.type, init_scale=init, enabled=runtime.use_scaler)


def run_training(config: TrainerConfig, stop: threading.Event) -> None:
    train, dist = config.train, config.distributed
    output_dir = Path(train.output_dir)
    runtime = resolve_runtime(config.device, dist)
    seed_everything(train.seed)
    model_dir = resolve_model_dir(config.model.bert_model)
    vocab = Vocabulary.from_tokenizer(load_tokenizer(model_dir, config.model.do_lower_case),
                                      config.model.do_lower_case)
    eval_index = None
    if config.eval.eval_corpus is not None:
        eval_index = load_eval_index(config.eval.eval_corpus, config.model.bert_model, config.model.do_lower_case,
                                     config.eval.cache_dir, vocab)

    checkpoints = Checkpoints(output_dir, train.keep_checkpoints)
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if not train.resume:
            checkpoints.remove_all()
        checkpoints.remove_stale()
    resume_from = checkpoints.latest() if train.resume else None
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    model = load_model(resume_from or model_dir)
    tokenizer = load_tokenizer_for_saving(model_dir, config.model.do_lower_case)
    if vocab.size > model.config.vocab_size:
        raise TrainerError(f"--bert_model {config.model.bert_model}: the tokenizer has {vocab.size} tokens but "
                           f"the model's embeddings only {model.config.vocab_size}")
    model.to(runtime.device)
    model.train()
    max_positions = model.config.max_position_embeddings

    source = open_source(config.source, train, vocab, max_positions, runtime, stop)
    metrics = None
    try:
        try:
            source.start()
        except StopRequested:
            raise StoppedEarly(0, resume_from) from None
        total_steps = plan_steps(train, source)
        optimizer, scheduler = build_optimizer(model, train, total_steps, runtime.device)
        scaler = make_scaler(runtime)
        start_step = 0
        if resume_from is not None:
            state = Checkpoints.load_state(resume_from)
            _warn_on_changed_config(state, config, total_steps)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            restore_rng_state(state["rng"])
            source.load_state_dict(state["source"])
            start_step = int(state["step"])

        evaluator = None
        if eval_index is not None:
            batches = eval_batches(eval_index, vocab, config.eval.eval_instances,
                                   source.max_seq_len or DEFAULT_MAX_SEQ_LEN, train.micro_batch_size)
            evaluator = Evaluator(batches, runtime.device, runtime.autocast_dtype)
        metrics = MetricsLog(output_dir, dist.is_main, resume_step=start_step if resume_from else None)
        log.info("training: steps %d..%d of %d instances (micro-batch %d x %d accumulation), warmup %d steps, "
                 "lr %g, %s on %s", start_step + 1, total_steps, train.train_batch_size, train.micro_batch_size,
                 train.gradient_accumulation_steps, int(train.warmup_proportion * total_steps),
                 train.learning_rate, runtime.precision, runtime.device)

        def save(step: int, source_state: dict) -> Path | None:
            if not dist.is_main:
                return None
            state = {"format": STATE_FORMAT, "step": step, "total_steps": total_steps,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "rng": rng_state(), "source": source_state,
                     "config": config.to_dict()}
            path = checkpoints.save(step, model, tokenizer, state)
            log.info("checkpoint: %s", path)
            return path

        with warnings.catch_warnings():
            # A step the GradScaler skips (an fp16 overflow, common in the first steps) makes torch warn that
            # the schedule stepped before the optimizer: intended here, as in every GradScaler loop.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            train_loop(model, source, optimizer, scheduler, scaler, runtime, train, total_steps, start_step,
                       evaluator, metrics, save, stop, config.eval.eval_steps)
        if dist.is_main:
            save_final(output_dir, model, tokenizer)
            log.info("done: model and tokenizer saved in %s", output_dir)
    finally:
        source.close()
        if metrics is not None:
            metrics.close()


def _warn_on_changed_config(state: dict, config: TrainerConfig, total_steps: int) -> None:
    before, now = state["config"]["train"], config.to_dict()["train"]
    changed = [f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in now if k != "resume" and before.get(k) != now[k]]
    if changed:
        log.warning("resuming with changed training flags (%s)", "; ".join(changed))
    if state["total_steps"] != total_steps:
        log.warning("the run now has %d steps instead of %d: the learning-rate schedule changes from here",
                    total_steps, state["total_steps"])


def train_loop(model, source, optimizer, scheduler, scaler, runtime: Runtime, train: TrainConfig,
               total_steps: int, start_step: int, evaluator: Callable | None, metrics: MetricsLog,
               save: Callable[[int, dict], Path | None], stop: threading.Event, eval_steps: int) -> None:
    """Optimizer steps start_step+1 .. total_steps; raises StoppedEarly after saving if `stop` gets set."""
    device, accum = runtime.device, train.gradient_accumulation_steps
    params = [p for p in model.parameters() if p.requires_grad]
    epoch_instances = source.epoch_instances
    run_start = time.perf_counter()

    step, saved = start_step, (None, None)  # (step, folder) of the newest checkpoint of this run
    source_state = source.state_dict()  # the source's position at the last step boundary
    if evaluator is not None:
        metrics.write(_eval_record(step, scheduler, evaluator(model), total_steps))

    # Interval sums, kept on the device: loss, mlm_loss, nsp_loss, mlm_correct, mlm_count, nsp_correct,
    # grad_norm. Host-side: instances, micro-batches, seconds blocked on the source, seconds of eval/saving.
    sums = torch.zeros(7, device=device)
    instances = micro_batches = steps_in_interval = 0
    wait_s = excluded_s = 0.0
    interval_start = time.perf_counter()

    try:
        while step < total_steps:
            if stop.is_set():
                raise StopRequested()
            for _ in range(accum):
                t0 = time.perf_counter()
                batch = source.next_batch().to(device, non_blocking=True)
                wait_s += time.perf_counter() - t0
                with runtime.autocast():
                    out = pretraining_loss(model, batch)
                scaler.scale(out.loss / accum).backward()  # the seed's averaging over accumulation steps
                sums[:6] += torch.stack([out.loss.detach(), out.mlm_loss.detach(), out.nsp_loss.detach(),
                                         out.mlm_correct.float(), out.mlm_count.float(), out.nsp_correct.float()])
                instances += batch.size
                micro_batches += 1
            scaler.unscale_(optimizer)  # true gradients, so clipping sees their real norm
            grad_norm = torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            scaler.step(optimizer)  # skipped if an fp16 gradient overflowed (found_inf goes to the fused kernel)
            if runtime.static_loss_scale is not None:
                scaler.update(runtime.static_loss_scale)
            else:
                scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_in_interval += 1
            sums[6] += grad_norm.float()
            source_state = source.state_dict()

            last = step == total_steps
            evaluate_now = evaluator is not None and (last or (eval_steps and step % eval_steps == 0))
            if last or evaluate_now or step % train.logging_steps == 0:
                values = sums.tolist()  # this is a sync point: the only one outside evaluation
                wall = time.perf_counter() - interval_start - excluded_s
                record = {
                    "step": step,
                    "epoch": (step * train.train_batch_size / epoch_instances) if epoch_instances else None,
                    "loss": values[0] / micro_batches, "mlm_loss": values[1] / micro_batches,
                    "nsp_loss": values[2] / micro_batches,
                    "mlm_accuracy": values[3] / max(values[4], 1.0), "nsp_accuracy": values[5] / instances,
                    "lr": scheduler.get_last_lr()[0], "grad_norm": values[6] / steps_in_interval,
                    "loss_scale": scaler.get_scale() if runtime.use_scaler else None,
                    "seq_per_s": instances / wall, "data_wait_frac": min(1.0, wait_s / wall),
                    "elapsed_s": time.perf_counter() - run_start,
                    **source.stats(),
                }
                if evaluate_now:
                    record.update(evaluator(model).to_record())
                metrics.write(record)
                log.info("%s", progress_line(record, total_steps))
                sums.zero_()
                instances = micro_batches = steps_in_interval = 0
                wait_s = excluded_s = 0.0
                interval_start = time.perf_counter()
            if last or (train.save_steps and step % train.save_steps == 0):
                t0 = time.perf_counter()
                saved = (step, save(step, source_state))
                excluded_s += time.perf_counter() - t0
    except StopRequested:
        # At a step boundary: any gradients of a half-accumulated step are dropped, and the checkpoint holds
        # the model, optimizer and source position as they were after `step`.
        path = saved[1] if saved[0] == step else save(step, source_state)
        raise StoppedEarly(step, path) from None


def _eval_record(step: int, scheduler, result, total_steps: int) -> dict:
    """The record of an evaluation outside a logging step (the one before training)."""
    record = {"step": step, "lr": scheduler.get_last_lr()[0], **result.to_record()}
    log.info("%s", progress_line(record, total_steps))
    return record
