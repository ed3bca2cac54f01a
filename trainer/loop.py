"""Set up a run (device, model, source, optimizer, schedule, resume) and train: the seed's loop, fed by a source.

`run_training` builds everything from the config sections into a `TrainContext` and hands it to `train_loop`,
the hot path, which reads top to bottom: fetch the step's micro-batches, forward under autocast, scaled
backward, then the GradScaler sequence (unscale, clip, step, update), the schedule, and on logging steps only,
the one sync that turns the device-side sums into a metrics record (trainer.metrics builds it). Under torchrun
every rank runs the same loop on its own data; `trainer.distributed` keeps the ranks on the same step.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common.index import CorpusIndex
from common.progress import log
from common.vocab import Vocabulary, decide_lower_case, load_tokenizer, resolve_model_dir
from trainer import StoppedEarly, TrainerError
from trainer import distributed
from trainer.checkpoint import STATE_FILE, Checkpoints, restore_rng_state, restore_torch_rng_state, rng_state, \
    save_final
from trainer.compiled import BACKEND, step_widths
from trainer.config import DeviceConfig, DistributedConfig, SourceConfig, TrainConfig, TrainerConfig
from trainer.distributed import FAIL, GO, STOP, Ranks
from trainer.evaluate import DEFAULT_MAX_SEQ_LEN, Evaluator, eval_batches, load_eval_index
from trainer.metrics import Interval, MetricsLog, evaluation_record, progress_line, training_record
from trainer.model import load_model, load_tokenizer_for_saving, parameter_groups
from trainer.pregenerated import PregeneratedSource
from trainer.source import DataTimeout, StopRequested, StreamSource

STATE_FORMAT = 1


@dataclass(frozen=True)
class Runtime:
    """The device and precision actually used (the flags, resolved against the machine)."""

    device: torch.device
    precision: str  # "fp16", "bf16" or "fp32"
    autocast_dtype: torch.dtype | None
    static_loss_scale: float | None  # fp16 with --loss_scale N; None = dynamic (or no scaler)
    compile_backend: str | None = None  # --compile: torch.compile's backend for the training step; None: eager

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
    """The device and precision this machine gives the flags, and whether the training step is compiled."""
    runtime = resolve_precision(config, distributed)
    return replace(runtime, compile_backend=BACKEND) if config.compile else runtime


def resolve_precision(config: DeviceConfig, distributed: DistributedConfig) -> Runtime:
    """The device (this rank's GPU, else the CPU) and the precision the flags ask for and the device allows."""
    if torch.cuda.is_available() and not config.no_cuda:
        if distributed.local_rank >= torch.cuda.device_count():
            raise TrainerError(f"local rank {distributed.local_rank} (--local_rank or LOCAL_RANK) but this machine "
                               f"has {torch.cuda.device_count()} GPU(s): run one process per GPU at most "
                               "(torchrun --nproc_per_node)")
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
        log_bf16_support(device)
        return Runtime(device, "bf16", torch.bfloat16, None)
    return Runtime(device, "fp32", None, None)


def log_bf16_support(device: torch.device) -> None:
    """Say whether `device` computes bfloat16 natively: GPUs before Ampere (V100, T4) run it emulated, slowly."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        # including_emulation=False: compute capability 8.0 or more; True would also accept a GPU that merely
        # stores bfloat16 tensors and emulates the arithmetic.
        if torch.cuda.is_bf16_supported(including_emulation=False):
            log.info("--bf16: %s (compute capability %d.%d) computes bfloat16 natively", name, major, minor)
        else:
            log.warning("--bf16: %s (compute capability %d.%d) has no native bfloat16 (it needs 8.0, Ampere or "
                        "newer): bfloat16 runs emulated and slower than fp32; use --fp16 on this GPU", name, major,
                        minor)
        return
    # CPU autocast runs matrix products (linear, bmm) in bfloat16 through oneDNN: native with AVX512-BF16 or
    # AMX, converted to float32 and back otherwise (often no faster than fp32).
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    log.info("--bf16 on the CPU: autocast runs matrix products in bfloat16, %s",
             "natively (this CPU has AVX512-BF16 or AMX)" if native else
             "emulated (this CPU has neither AVX512-BF16 nor AMX: expect no speed-up over fp32)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def open_source(config: SourceConfig, train: TrainConfig, vocab: Vocabulary, max_positions: int,
                runtime: Runtime, stop: threading.Event, place: DistributedConfig = DistributedConfig(), local=None,
                compiled: bool = False):
    """Each rank's own data: its share of every round of the pregenerated files, or its own stream endpoint.

    With `local` (the LocalProducers of --train_corpus) the rank binds its private endpoint, and --bind too only
    when it was given; a local producer that ends by itself ends the wait for data with its status. Either pads
    each micro-batch to its longest row's allowed width (`compiled`: --compile's few widths; common.lengths).
    """
    if config.pregenerated_data is not None:
        return PregeneratedSource(config.pregenerated_data, train.epochs, vocab, max_positions,
                                  train.micro_batch_size, train.seed, reduce_memory=config.reduce_memory,
                                  pin_memory=runtime.pin_memory, shard=(place.rank, place.world_size),
                                  pad_to_multiple_of=config.pad_to_multiple_of, compiled=compiled)
    hint = None  # for the data-timeout message: what a producer runs to feed this node's ranks
    if place.local_world_size > 1:
        hint = f"--connect {config.bind} --ranks_per_endpoint {place.local_world_size}"
    bind, also_bind, alive = place.endpoint(config.bind), (), None
    if local is not None:  # issue 14
        also_bind = (bind,) if local.config.remote_bind else ()
        bind, alive, hint = place.endpoint(local.endpoint), local.check, "--train_corpus (the local producer)"
    return StreamSource(bind, vocab.fingerprint(max_positions), max_positions,
                        train.micro_batch_size, pin_memory=runtime.pin_memory,
                        prefetch_batches=config.prefetch_batches, max_message_bytes=config.max_message_bytes,
                        data_timeout_s=config.data_timeout_s, stop=stop, curve=config.curve_keys(),
                        connect_hint=hint, mix_rows=config.mix_rows, mix_seed=(train.seed, place.rank),
                        also_bind=also_bind, alive=alive, group_by_length=config.group_by_length,
                        pad_to_multiple_of=config.pad_to_multiple_of, compiled=compiled)


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


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    return int(train.warmup_proportion * total_steps)


# --lr_scheduler_type -> transformers' schedule name. Every choice warms up over --warmup_proportion first:
# transformers' "constant" would ignore the warmup, so constant here is its "constant_with_warmup".
_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def build_optimizer(model, train: TrainConfig, total_steps: int, device: torch.device, fused: bool | None = None):
    """AdamW (fused on CUDA unless `fused` says otherwise: with a GradScaler its step needs no sync) and the
    schedule from transformers' `get_scheduler`: linear warmup, then --lr_scheduler_type's decay (linear to 0 by
    default, the seed's). It is a LambdaLR whose state_dict is its step count, so a resume continues it exactly."""
    from transformers import get_scheduler

    if fused is None:
        fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(parameter_groups(model, train.weight_decay), lr=train.learning_rate,
                                  fused=fused or None)
    scheduler = get_scheduler(_SCHEDULES[train.lr_scheduler_type], optimizer,
                              num_warmup_steps=warmup_steps(train, total_steps), num_training_steps=total_steps)
    return optimizer, scheduler


def make_scaler(runtime: Runtime) -> torch.amp.GradScaler:
    """Dynamic scaling by default; a static --loss_scale is the same scaler reset to that value each update
    (steps whose gradients overflow are still skipped, but the scale never moves)."""
    init = runtime.static_loss_scale or 2.0**16
    return torch.amp.GradScaler(runtime.device.type, init_scale=init, enabled=runtime.use_scaler)


@dataclass(frozen=True)
class Inputs:
    """What the run reads before CUDA or the process group exists: the model's files, vocabulary, eval index."""

    model_dir: Path  # holds the weights too (a hub name resolves to its whole snapshot)
    vocab: Vocabulary  # its do_lower_case is the decided one (flag, else the tokenizer's own setting)
    eval_index: CorpusIndex | None  # rank 0's, with --eval_corpus


def prepare_inputs(config: TrainerConfig) -> Inputs:
    """Resolve the model, decide lower-casing, and tokenize the evaluation corpus (rank 0 only).

    This runs before `resolve_runtime` and `distributed.start`: the evaluation index is built by a forked
    pool of tokenizer processes, and a fork once CUDA is initialised or the process group's threads run can
    leave the children with a broken CUDA context or a lock held forever.
    """
    model_dir = resolve_model_dir(config.model.bert_model, with_weights=True)
    lower = decide_lower_case(model_dir, config.model.do_lower_case)
    if config.distributed.is_main:
        log.info("%s", lower.describe())
    vocab = Vocabulary.from_tokenizer(load_tokenizer(model_dir, lower.do_lower_case), lower.do_lower_case)
    eval_index = None
    if config.eval.eval_corpus is not None and config.distributed.is_main:  # rank 0 evaluates; the others wait
        eval_index = load_eval_index(config.eval.eval_corpus, config.model.bert_model, lower.do_lower_case,
                                     config.eval.cache_dir, vocab, text_field=config.eval.text_field,
                                     dataset_split=config.eval.dataset_split,
                                     split_sentences=config.eval.split_sentences)
    return Inputs(model_dir, vocab, eval_index)


def run_training(config: TrainerConfig, stop: threading.Event, local=None) -> None:
    """Train as `config` says; `local` is the LocalProducers started for --train_corpus (issue 14), or None."""
    inputs = prepare_inputs(config)  # first: it forks (see there)
    runtime = resolve_runtime(config.device, config.distributed)
    ranks = distributed.start(config.distributed, runtime.device, config.source.data_timeout_s)
    try:
        _run_training(config, stop, runtime, ranks, inputs, local)
    finally:
        ranks.close()


def _run_training(config: TrainerConfig, stop: threading.Event, runtime: Runtime, ranks: Ranks,
                  inputs: Inputs, local=None) -> None:
    train = config.train
    output_dir = Path(train.output_dir)
    seed_everything(train.seed + ranks.rank)  # rank 0 as a single process; each rank its own dropout stream
    model_dir, vocab, eval_index = inputs.model_dir, inputs.vocab, inputs.eval_index
    # What the checkpoint's instances and weights depend on: a resume must not change them (see check_unchanged).
    fixed_inputs = {"bert_model": normalized_model_name(config.model.bert_model), "do_lower_case": vocab.do_lower_case}

    checkpoints = Checkpoints(output_dir, train.keep_checkpoints)
    if ranks.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if not train.resume:
            checkpoints.remove_all()
        checkpoints.remove_stale()
    resume_from = checkpoints.latest() if train.resume and ranks.is_main else None
    resume_from = agree_on_checkpoint(ranks, checkpoints, resume_from)
    state = None
    if resume_from is not None:
        if ranks.is_main:
            log.info("resuming from %s", resume_from)
        state = Checkpoints.load_state(resume_from)
        check_world_size(state, resume_from, ranks.world_size)
        check_unchanged(saved_inputs(state), fixed_inputs, resume_from)
    model = load_model(resume_from or model_dir)
    tokenizer = load_tokenizer_for_saving(model_dir, vocab.do_lower_case)
    if vocab.size > model.config.vocab_size:
        raise TrainerError(f"--bert_model {config.model.bert_model}: the tokenizer has {vocab.size} tokens but "
                           f"the model's embeddings only {model.config.vocab_size}")
    model.to(runtime.device)
    model.train()
    max_positions = model.config.max_position_embeddings

    source = open_source(config.source, train, vocab, max_positions, runtime, stop, config.distributed, local,
                         compiled=config.device.compile)
    metrics = None
    try:
        start_source(source, ranks, resume_from)
        fixed_inputs["max_seq_len"] = source.max_seq_len
        if state is not None:
            check_seq_len(saved_inputs(state).get("max_seq_len"), source.max_seq_len, resume_from, state,
                          train.allow_max_seq_len_change and ranks.is_main, train.allow_max_seq_len_change)
        total_steps = resumed_plan(state, train) if state is not None else None
        if total_steps is None:
            total_steps = plan_steps(train, source)
        optimizer, scheduler = build_optimizer(model, train, total_steps, runtime.device)
        scaler = make_scaler(runtime)
        start_step = 0
        if state is not None:
            if ranks.is_main:
                _warn_on_changed_config(state, config, total_steps)
            restore_training_state(state, optimizer, scheduler, scaler, runtime, ranks)
            source.load_state_dict(state["source"])
            start_step = int(state["step"])

        evaluator = None
        if eval_index is not None:
            batches = eval_batches(eval_index, vocab, config.eval.eval_instances,
                                   source.max_seq_len or DEFAULT_MAX_SEQ_LEN, train.micro_batch_size)
            evaluator = Evaluator(batches, runtime.device, runtime.autocast_dtype)
        metrics = MetricsLog(output_dir, ranks.is_main, resume_step=start_step if resume_from else None)
        if ranks.is_main:
            log.info("training: steps %d..%d of %d instances (micro-batch %d x %d accumulation x %d rank(s)), "
                     "warmup %d steps then %s, lr %g, %s on %s", start_step + 1, total_steps,
                     train.train_batch_size, train.micro_batch_size, train.gradient_accumulation_steps,
                     ranks.world_size, warmup_steps(train, total_steps), train.lr_scheduler_type,
                     train.learning_rate, runtime.precision, runtime.device)

        def save(step: int, source_state: dict) -> Path:
            """Rank 0 writes the checkpoint; the other ranks wait for it (and hand it their random states)."""
            rank_rng = ranks.gather_rng_states(runtime.device) if ranks.distributed else None
            path = checkpoints.folder(step)
            if ranks.is_main:
                state = {"format": STATE_FORMAT, "step": step, "total_steps": total_steps,
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict(), "rng": rng_state(runtime.device), "source": source_state,
                         "config": config.to_dict(), "inputs": dict(fixed_inputs)}
                if rank_rng is not None:
                    state["rank_rng"] = rank_rng
                path = checkpoints.save(step, model, tokenizer, state)
                log.info("checkpoint: %s", path)
            ranks.barrier("waiting for rank 0's checkpoint")
            return path

        with warnings.catch_warnings():
            # A step the GradScaler skips (an fp16 overflow, common in the first steps) makes torch warn that
            # the schedule stepped before the optimizer: intended here, as in every GradScaler loop.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            step = train_loop(TrainContext(
                model, source, optimizer, scheduler, scaler, runtime, train, total_steps, metrics, save, stop,
                start_step=start_step, evaluator=evaluator, eval_steps=config.eval.eval_steps, ranks=ranks,
                evaluates=config.eval.eval_corpus is not None,
                widths=step_widths(source.max_seq_len, config.source.pad_to_multiple_of)))
        if ranks.is_main:
            save_final(output_dir, model, tokenizer)
            log.info("done: model and tokenizer saved in %s", output_dir)
        if ranks.distributed:
            checksum = ranks.check_same_parameters(model)
            log.info("rank %d finished at step %d after %d step(s) of its own data; parameter checksum %s (the "
                     "same on every rank)", ranks.rank, step, step - start_step, checksum)
    finally:
        source.close()
        if metrics is not None:
            metrics.close()


def agree_on_checkpoint(ranks: Ranks, checkpoints: Checkpoints, latest: Path | None) -> Path | None:
    """Rank 0's newest checkpoint (None: start afresh); every rank loads it, so every rank must be able to read it."""
    if not ranks.distributed:
        return latest
    step = int(ranks.gather([checkpoints.step_of(latest) if latest else -1], "choosing the checkpoint")[0][0])
    if step < 0:
        return None
    folder = checkpoints.folder(step)
    failure = None
    if not (folder / STATE_FILE).is_file():
        failure = TrainerError(f"rank {ranks.rank} cannot read {folder}, the checkpoint rank 0 resumes from: with "
                               "several nodes, --output_dir must be a folder every node sees (a shared "
                               "filesystem); or pass --no_resume to start afresh")
    ranks.agree(FAIL if failure else GO, failure, what="checking the checkpoint")
    return folder


def check_world_size(state: dict, folder: Path, world_size: int) -> None:
    """A run resumes with the processes that wrote its checkpoint: each rank's stream, micro-batch and random
    state belong to that layout."""
    before = state["config"]["distributed"].get("world_size", 1)
    if before != world_size:
        raise TrainerError(f"checkpoint {folder} was written by {before} rank(s); this run has {world_size}: resume "
                           f"with {before} process(es) in all (torchrun --nnodes x --nproc_per_node; a plain "
                           "bertstream-trainer is 1) or start afresh with --no_resume")


def restore_training_state(state: dict, optimizer, scheduler, scaler: torch.amp.GradScaler, runtime: Runtime,
                           ranks: Ranks) -> None:
    """The optimizer, schedule, loss scale and random states of a checkpoint, carried over to this run's setup.

    A resume may change precision, device or GPU count: what cannot be carried over is started fresh and said
    in one line. The optimizer's state (moments, steps, learning rates) comes back, but its implementation
    (fused, foreach, capturable) is this run's: the checkpoint's would leave an optimizer built fused for
    CUDA unfused after loading, and GradScaler then hands the unfused step its inf check (an AssertionError).
    """
    load_optimizer_state(optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    lost = []
    saved_scale = state["scaler"].get("scale")  # {} from a GradScaler that was disabled (fp32, bf16, CPU)
    if runtime.use_scaler and saved_scale is None:
        lost.append(f"a loss scale (the checkpoint was written without fp16's GradScaler): starting at "
                    f"{scaler.get_scale():g}")
    elif runtime.use_scaler:
        scaler.load_state_dict(state["scaler"])
    elif saved_scale is not None:
        lost.append(f"the loss scale {saved_scale:g} (this run trains in {runtime.precision}, without a GradScaler)")
    lost += restore_rng_state(state["rng"], runtime.device)  # rank 0's; then each rank's own torch generators
    if "rank_rng" in state:
        lost += restore_torch_rng_state(state["rank_rng"][ranks.rank], runtime.device)
    if lost:
        log.warning("resume: not carried over from the checkpoint: %s", "; ".join(dict.fromkeys(lost)))


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """`optimizer.load_state_dict`, keeping this optimizer's implementation choices.

    torch copies every key of the saved parameter groups, `fused` and `foreach` included, and decides from
    the saved groups where each parameter's `step` counter lives (on the parameter's device for fused or
    capturable, on the CPU otherwise): so the saved groups get this run's choices before loading.
    """
    keys = ("fused", "foreach", "capturable")
    if len(saved["param_groups"]) == len(optimizer.param_groups):  # else torch's own error names the mismatch
        saved = {**saved, "param_groups": [{**group, **{k: now[k] for k in keys if k in now}}
                                           for group, now in zip(saved["param_groups"], optimizer.param_groups)]}
    optimizer.load_state_dict(saved)


def start_source(source, ranks: Ranks, resume_from: Path | None) -> None:
    """Every rank's source has its first batch, and the ranks agree on what it says.

    The stream's max_seq_len must be the same on every rank. The epoch size (which turns --epochs into
    steps) is rank 0's, so every rank plans the same number of steps even if producers announce different
    sizes.
    """
    vote, failure = GO, None
    try:
        source.start()
    except StopRequested:
        vote = STOP
    except TrainerError as exc:  # a mismatched producer, a data timeout, an endpoint in use
        vote, failure = FAIL, exc
    try:
        shapes = ranks.agree(vote, failure, [source.max_seq_len or 0, source.epoch_instances or 0],
                             "starting the stream")
    except StopRequested:
        raise StoppedEarly(0, resume_from) from None
    lengths = [int(s[0]) for s in shapes]
    if len(set(lengths)) > 1:
        raise TrainerError(f"the ranks' first batches have different max_seq_len ({lengths}, by rank): every "
                           "producer must use the same --max_seq_len")
    sizes = [int(s[1]) for s in shapes]
    if len(set(sizes)) > 1:
        if ranks.is_main:  # an estimate, which varies a little with each producer's --seed
            log.info("the ranks' first producers announce epoch sizes %s (by rank); the schedule uses rank 0's",
                     sizes)
        source.epoch_instances = sizes[0] or None


def normalized_model_name(bert_model: str) -> str:
    """A local directory as its absolute path (`./m` and `/abs/m` are one model); a hub name as given."""
    path = Path(bert_model).expanduser()
    return str(path.resolve()) if path.is_dir() else bert_model


def saved_inputs(state: dict) -> dict:
    """The checkpoint's model, lower-casing and max_seq_len (older checkpoints: what their config says)."""
    if "inputs" in state:
        return state["inputs"]
    model = state["config"].get("model", {})
    return {"bert_model": normalized_model_name(model["bert_model"]) if "bert_model" in model else None,
            "do_lower_case": model.get("do_lower_case")}


# How each input is named to the user, and what sets it.
_INPUT_FLAGS = {
    "bert_model": ("--bert_model", lambda v: f"--bert_model {v}"),
    "do_lower_case": ("lower-casing", lambda v: "--do_lower_case" if v else "--no_lower_case"),
    "max_seq_len": ("the stream's max_seq_len", lambda v: f"producers with --max_seq_len {v}"),
}


def check_unchanged(saved: dict, now: dict, folder: Path) -> None:
    """Refuse a resume that changes what the checkpoint's weights and step plan were made from.

    A run that resumed on another model, other casing or other sequence lengths would train on in a way no
    single run could have, and silently: each key of `now` must equal the checkpoint's (unknown ones pass).
    """
    for key, value in now.items():
        before = saved.get(key)
        if before is None or value is None or before == value:
            continue
        what, how = _INPUT_FLAGS[key]
        phase = " or pass --allow_max_seq_len_change (a second phase at the new length)," if key == "max_seq_len" \
            else ""
        raise TrainerError(f"checkpoint {folder} was trained with {what} {before!r}; this run has {value!r}. "
                           f"Resume with {how(before)},{phase} or start afresh with --no_resume")


def check_seq_len(before: int | None, now: int, folder: Path, state: dict, say: bool, allowed: bool) -> None:
    """A resume at another max_seq_len is BERT's second phase when --allow_max_seq_len_change says so, else an error.

    Google's recipe trains 90% of the steps at 128 and the rest at 512, one schedule over both: the optimizer,
    the schedule and the step count carry on; only the instances change (the model's positions beyond 128 start
    training now). `say`: this process logs the change.
    """
    if before is None or before == now:
        return
    if not allowed:
        check_unchanged({"max_seq_len": before}, {"max_seq_len": now}, folder)
    if say:
        log.info("resume: max_seq_len %d -> %d (--allow_max_seq_len_change): a new phase from step %d of %d, the "
                 "optimizer and the learning-rate schedule continue", before, now, int(state["step"]),
                 int(state["total_steps"]))


def resumed_plan(state: dict, train: TrainConfig) -> int | None:
    """The checkpoint's total steps, which a resume keeps unless --max_steps says otherwise (None: plan anew).

    Re-planning a stream run from a fresh estimate of the epoch size would move the schedule's end, and so
    every learning rate from here on.
    """
    if train.max_steps:
        return None
    before = state["config"]["train"].get("epochs")
    if before is not None and before != train.epochs:
        log.warning("--epochs %d (the checkpoint's run had %d): the step plan stays the checkpoint's %d steps; "
                    "pass --max_steps to change it", train.epochs, before, state["total_steps"])
    return int(state["total_steps"])


def _warn_on_changed_config(state: dict, config: TrainerConfig, total_steps: int) -> None:
    before, now = state["config"]["train"], config.to_dict()["train"]
    # A field the checkpoint predates had its default then (lr_scheduler_type: the linear schedule).
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    changed = [f"{k}: {before.get(k, defaults[k])!r} -> {now[k]!r}" for k in now
               if k != "resume" and before.get(k, defaults[k]) != now[k]]
    if changed:
        log.warning("resuming with changed training flags (%s)", "; ".join(changed))
    if state["total_steps"] != total_steps:
        log.warning("the run now has %d steps instead of %d: the learning-rate schedule changes from here",
                    total_steps, state["total_steps"])


def next_step_batches(source, accum: int, stop: threading.Event, ranks: Ranks) -> tuple[list, float]:
    """The step's micro-batches and the seconds spent waiting for them, once every rank has its own.

    Raises StopRequested on every rank alike if any rank is stopping, and ends every rank if one cannot go
    on: the step's one vote (see trainer.distributed; with one process it decides nothing).
    """
    batches, vote, failure = [], GO, None
    start = time.perf_counter()
    try:
        if stop.is_set():
            raise StopRequested()
        for _ in range(accum):
            batches.append(source.next_batch())
    except StopRequested:
        vote = STOP
    except TrainerError as exc:  # a data timeout, a mismatched first producer: this rank cannot go on
        vote, failure = FAIL, exc
    waited = time.perf_counter() - start
    ranks.agree(vote, failure)
    return batches, waited


@dataclass
class TrainContext:
    """What `train_loop` trains and with what: built by `run_training` (or a test) from the config sections."""

    model: torch.nn.Module  # BertForPreTraining, on runtime.device
    source: object  # next_batch(), state_dict(), stats(), epoch_instances: trainer.source / trainer.pregenerated
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    runtime: Runtime
    train: TrainConfig
    total_steps: int  # the last step the loop runs
    metrics: MetricsLog
    save: Callable[[int, dict], Path | None]  # (step, the source's state) -> the checkpoint folder
    stop: threading.Event  # set by SIGTERM/SIGINT: save at the next step boundary and raise StoppedEarly
    start_step: int = 0  # the step the run resumes after (0: a new run)
    evaluator: Callable | None = None  # rank 0's held-out evaluation (model -> result), if any
    eval_steps: int = 0  # evaluate every this many steps (0: only before the first and at the last)
    ranks: Ranks = field(default_factory=Ranks.single)  # the other training processes (none: Ranks.single())
    evaluates: bool | None = None  # rank 0 has an evaluator (the others have none); None: `evaluator is not None`
    widths: tuple[int, ...] = ()  # the widths the source pads micro-batches to (--compile compiles a graph for
    # each); () = compiled.step_widths(source.max_seq_len), the source's ladder without --pad_to_multiple_of


def train_loop(ctx: TrainContext) -> int:
    """Optimizer steps start_step+1 .. total_steps; raises StoppedEarly after saving if `stop` gets set.

    Every rank runs this on its own micro-batches. Only rank 0 has the `evaluator`; `evaluates` tells the
    others that rank 0 has one. Returns the last step.
    """
    model, source, optimizer, scheduler, scaler = ctx.model, ctx.source, ctx.optimizer, ctx.scheduler, ctx.scaler
    runtime, train, total_steps, metrics, ranks = ctx.runtime, ctx.train, ctx.total_steps, ctx.metrics, ctx.ranks
    evaluator, eval_steps = ctx.evaluator, ctx.eval_steps
    evaluates = evaluator is not None if ctx.evaluates is None else ctx.evaluates
    device, accum = runtime.device, train.gradient_accumulation_steps
    # The masked-positions loss; under DDP with several ranks; with --compile, compiled: a graph per width.
    forward = ranks.wrap(model, runtime.compile_backend, ctx.widths or step_widths(source.max_seq_len))
    params = [p for p in model.parameters() if p.requires_grad]
    run_start = time.perf_counter()

    step, saved = ctx.start_step, (None, None)  # (step, folder) of the newest checkpoint of this run
    source_state = source.state_dict()  # the source's position at the last step boundary
    if evaluator is not None:
        record = evaluation_record(step, scheduler.get_last_lr()[0], evaluator(model).to_record())
        metrics.write(record)
        log.info("%s", progress_line(record, total_steps))
    if evaluates:
        ranks.barrier("waiting for rank 0's evaluation")

    # Interval sums, kept on the device (trainer.metrics.DEVICE_SUMS): loss, mlm_loss, nsp_loss, mlm_correct,
    # mlm_count, nsp_correct, grad_norm. Host-side counts are in `interval`.
    sums = torch.zeros(7, device=device)
    interval = Interval()

    try:
        while step < total_steps:
            batches, waited = next_step_batches(source, accum, ctx.stop, ranks)
            interval.wait_s += waited
            for i, batch in enumerate(batches):
                batch = batch.to(device, non_blocking=True)
                # Gradients only accumulate on all but the last micro-batch; there DDP all-reduces them.
                with ranks.accumulating(forward, i < accum - 1), runtime.autocast():
                    out = forward(batch)
                scaler.scale(out.loss / accum).backward()  # the seed's averaging over accumulation steps
                sums[:6] += torch.stack([out.loss.detach(), out.mlm_loss.detach(), out.nsp_loss.detach(),
                                         out.mlm_correct.float(), out.mlm_count.float(), out.nsp_correct.float()])
                interval.instances += batch.size
                interval.micro_batches += 1
                interval.tokens += batch.tokens
                interval.positions += batch.size * batch.width
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
            interval.steps += 1
            sums[6] += grad_norm.float()
            source_state = source.state_dict()

            last = step == total_steps
            evaluate_now = evaluates and (last or (eval_steps and step % eval_steps == 0))
            if last or evaluate_now or step % train.logging_steps == 0:
                ranks.sum_(sums)  # every rank's sums: the record is the whole step's, not rank 0's share
                values = sums.tolist()  # this is a sync point: the only one outside evaluation
                stats = source.stats()
                per_rank = ranks.gather(interval.rank_figures(stats), "gathering the figures")
                record = training_record(
                    step, values, interval, per_rank, list(stats), world_size=ranks.world_size,
                    lr=scheduler.get_last_lr()[0], loss_scale=scaler.get_scale() if runtime.use_scaler else None,
                    instances_per_step=train.train_batch_size, epoch_instances=source.epoch_instances,
                    elapsed_s=time.perf_counter() - run_start)
                shares = getattr(source, "blend_shares", lambda: None)()
                if shares is not None:  # this rank's received instances by corpus: the blend as trained here
                    record["blend_shares"] = shares
                if evaluate_now and evaluator is not None:
                    record.update(evaluator(model).to_record())
                metrics.write(record)
                if ranks.is_main:
                    log.info("%s", progress_line(record, total_steps))
                if evaluate_now:
                    ranks.barrier("waiting for rank 0's evaluation")
                sums.zero_()
                interval = Interval()
            if last or (train.save_steps and step % train.save_steps == 0):
                t0 = time.perf_counter()
                saved = (step, ctx.save(step, source_state))
                interval.excluded_s += time.perf_counter() - t0
    except StopRequested:
        # At a step boundary, the same on every rank: gradients of a half-accumulated step are dropped, and
        # the checkpoint holds the model, optimizer and source position as they were after `step`.
        path = saved[1] if saved[0] == step else ctx.save(step, source_state)
        raise StoppedEarly(step, path) from None
    except DataTimeout:
        # No batch for --data_timeout, at a step boundary: keep the steps trained since the last checkpoint, so
        # the same command resumes there. One process only: with several, the others stop on PeerFailed (which
        # also means a lost rank), and a checkpoint needs every rank.
        if not ranks.distributed and step > ctx.start_step and saved[0] != step:
            ctx.save(step, source_state)
        raise
    return step
