"""``train_and_evaluate(config, workdir)``: a pretraining run from config to checkpoints.

It checks the config, builds the model, mesh, optimizer and inputs, and hands them to
``runner.run`` (restore or initialise, then ``loop.run_steps``: dispatch order, periods,
NaN guard), the same run SuperGLUE fine-tuning uses.
Process 0 writes metrics; every process saves its shards of the checkpoint.

The work directory is a contract (``workdir.py``): a restart is compared with the recorded
config before anything is read or written and refused when the experiment would change;
every check that can run before the first step does (``preflight.py``); the first SIGINT or
SIGTERM saves at the next step boundary and returns (``interrupts.py``), and the caller exits
with ``128 + signum``; after a resume, ``metrics.jsonl`` and TensorBoard show each step once.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
from absl import logging

from rope_jax import config_boundary, families
from rope_jax.data.pipeline import DataConfig
from rope_jax.training import losses, preflight, runner, sharding
from rope_jax.training import workdir as workdir_lib

# Re-exported: callers and tests know them as trainer.*.
from rope_jax.training.loop import (  # noqa: F401
    NonFiniteLossError,
    TrainResult,
    model_flops_per_step,
)
from rope_jax.training.runner import (  # noqa: F401
    CheckpointableIterator,
    Inputs,
    set_prng_impl,
)


def build_model(config: ml_collections.ConfigDict):
    """(flax module, frozen model config) from ``config.model``; packing and the objective
    from ``config.data`` decide which attention kernels are allowed (packed rows need full
    masks or segment ids, a prefix LM a full mask), and its row lengths how long a learned
    position table must be."""
    from rope_jax.models import build_model as build

    try:
        cfg = config_boundary.model_section(config)
        data = config_boundary.data_section(config)
        longest = max(data.inputs_length, data.decoder_length())
        model = build(
            cfg,
            packed_inputs=data.pack and data.sampling == "documents",
            max_sequence_length=longest,
            prefix_lm=data.objective == "prefix_lm",
        )
        return model, cfg
    except config_boundary.ConfigKeyError:
        raise
    except ValueError as err:
        raise ValueError(
            f"config.model: {err} (model keys are --config.model.<key>; packing is "
            f"--config.data.pack={config.data.pack}, the objective "
            f"--config.data.objective={config.data.objective})"
        ) from err


def _check_epochs_on_processes(config: ml_collections.ConfigDict, process_count: int) -> None:
    """A finite ``data.num_epochs`` is for one process only: each process's rows run out
    at their own step (their documents' lengths differ), and a process that stopped would
    leave the others waiting in the next step's collectives."""
    num_epochs = config.data.get("num_epochs")
    if num_epochs is not None and process_count > 1:
        raise preflight.ConfigError(
            f"data.num_epochs={num_epochs} with {process_count} processes: the processes' "
            "rows would run out at different steps and the others would wait for the first "
            "one forever. Leave data.num_epochs unset (the input repeats) and bound the run "
            "with num_train_steps, or train on one process."
        )


def data_settings(config: ml_collections.ConfigDict) -> DataConfig:
    """``config.data`` as a ``DataConfig`` (batch size and seed from the top level)."""
    return config_boundary.data_section(config)


def build_corpus(config: ml_collections.ConfigDict):
    """The training corpus of ``config.data``: an index of its files (one scan), or the
    embedded corpus when ``data.paths`` is empty."""
    from rope_jax.data import embedded
    from rope_jax.data.corpora import DocumentIndex

    if not config.data.paths:
        return embedded.embedded_corpus()
    with preflight.config_errors("data: "):
        return DocumentIndex(
            config.data.paths,
            format=config.data.format,
            text_mode=config.data.text_mode,
            text_field=config.data.text_field,
        )


def build_tokenizer(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    documents=None,
    reuse_for_other_corpus: bool = False,
):
    """The configured SentencePiece model, or one trained on the training corpus (cached in
    ``<workdir>/tokenizer``, never trained again: see ``load_or_train_tokenizer``); with
    ``tokenizer.kind=jieba_bert`` the T5 PEGASUS tokenizer (``data/bert_vocab.py``), with
    ``tokenizer.kind=bytes`` UTF-8 bytes (``data/byte_tokenizer.py``).

    A loaded model keeps ``tokenizer.num_extra_ids`` extra ids after its pieces, whatever the
    model's vocabulary: mT5's ``spiece.model`` (250000 pieces + 100) puts ``<extra_id_0>`` at
    250099 while the mT5 embedding has 250112 rows. ``model.vocab_size`` must be at least
    the tokenizer's; a trained tokenizer fills it exactly. ``documents``: the corpus when
    already indexed (``build_corpus``); ``reuse_for_other_corpus``: keep a cached tokenizer
    for a changed ``data.paths``.
    """
    from rope_jax.data import embedded
    from rope_jax.data.tokenizer import Tokenizer

    vocab_size = config.model.vocab_size
    with preflight.config_errors("tokenizer: "):
        kind = _tokenizer_kind(config)
    if kind == "jieba_bert":
        with preflight.config_errors():
            tokenizer = _jieba_bert_tokenizer(config, workdir, documents=documents)
    elif kind == "bytes":
        from rope_jax.data.byte_tokenizer import ByteTokenizer

        tokenizer = ByteTokenizer()
    elif config.tokenizer.path:
        tokenizer = Tokenizer.load(
            config.tokenizer.path, num_extra_ids=config.tokenizer.num_extra_ids
        )
    elif config.data.paths:
        documents = build_corpus(config) if documents is None else documents
        tokenizer = embedded.load_or_train_tokenizer(
            workdir,
            vocab_size=vocab_size,
            num_extra_ids=config.tokenizer.num_extra_ids,
            documents=(documents[i] for i in range(len(documents))),
            corpus_name=config.data.paths,
            reuse_for_other_corpus=reuse_for_other_corpus,
        )
    else:
        tokenizer = embedded.load_or_train_tokenizer(
            workdir,
            vocab_size=vocab_size,
            num_extra_ids=config.tokenizer.num_extra_ids,
            reuse_for_other_corpus=reuse_for_other_corpus,
        )
    if tokenizer.vocab_size > vocab_size:
        raise preflight.ConfigError(
            f"tokenizer has {tokenizer.vocab_size} ids ({tokenizer.piece_size} pieces + "
            f"{tokenizer.num_extra_ids} extra ids) but model.vocab_size={vocab_size}; set "
            f"--config.model.vocab_size={tokenizer.vocab_size} or more."
        )
    return tokenizer


def _tokenizer_kind(config: ml_collections.ConfigDict) -> str:
    """``config.tokenizer.kind``, checked against the keys given for it."""
    from rope_jax.data.tokenizers import check_kind

    kind = check_kind(config.tokenizer.get("kind", "sentencepiece"))
    if kind == "jieba_bert" and config.tokenizer.path:
        raise ValueError(
            "tokenizer.path names a SentencePiece model; for tokenizer.kind=jieba_bert give a "
            "BERT vocab.txt as --config.tokenizer.vocab_path (or nothing, to build one)"
        )
    if kind == "bytes" and (config.tokenizer.path or config.tokenizer.get("vocab_path")):
        raise ValueError(
            "tokenizer.kind=bytes reads no tokenizer file; clear tokenizer.path and "
            "tokenizer.vocab_path, or choose tokenizer.kind=sentencepiece or jieba_bert"
        )
    if kind == "sentencepiece" and config.tokenizer.get("vocab_path"):
        raise ValueError(
            "tokenizer.vocab_path is a BERT vocab.txt, read by tokenizer.kind=jieba_bert; set "
            "--config.tokenizer.kind=jieba_bert, or tokenizer.path for a SentencePiece model"
        )
    return kind


def _jieba_bert_tokenizer(config: ml_collections.ConfigDict, workdir: str, *, documents=None):
    """T5 PEGASUS' jieba + BERT-vocabulary tokenizer: ``tokenizer.vocab_path``, or a
    ``model.vocab_size``-token vocabulary built on the training corpus (cached)."""
    from rope_jax.data import bert_vocab, embedded

    vocab_path = config.tokenizer.vocab_path
    if vocab_path:
        documents, corpus_name = None, ""
    elif config.data.paths:
        index = build_corpus(config) if documents is None else documents
        documents, corpus_name = (index[i] for i in range(len(index))), config.data.paths
    else:
        documents, corpus_name = embedded.embedded_documents(), embedded.EMBEDDED_NAME
    return bert_vocab.load_or_build_tokenizer(
        workdir,
        vocab_size=config.model.vocab_size,
        vocab_path=vocab_path,
        documents=documents,
        corpus_name=corpus_name,
    )


def build_inputs(
    config: ml_collections.ConfigDict, workdir: str, *, reuse_tokenizer: bool = False
) -> Inputs:
    """Training and held-out inputs from ``config.data`` for this process.

    The corpus is indexed once and the held-out split checked before a tokenizer is trained
    on it (minutes on a real corpus), so a corpus too small to evaluate on fails at start.
    """
    from rope_jax.data import pipeline

    with preflight.config_errors():
        data = data_settings(config)
    documents = build_corpus(config)
    evaluates = config.eval_steps > 0 and config.eval_every_steps > 0
    preflight.check_held_out_split(
        len(documents),
        eval_every=config.data.eval_every,
        evaluates=evaluates,
        process_count=jax.process_count(),
        source=config.data.paths or "the embedded corpus",
        first_eval_step=config.eval_every_steps if evaluates else 0,
    )
    tokenizer = build_tokenizer(
        config, workdir, documents=documents, reuse_for_other_corpus=reuse_tokenizer
    )
    shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
    if data.sampling == "windows":
        from rope_jax.data import windows

        with preflight.config_errors("data: "):
            train, eval_batches = windows.make_window_inputs(
                data, tokenizer, documents, eval_steps=config.eval_steps, **shard
            )
        return Inputs(train=train, eval_batches=eval_batches if evaluates else None)
    with preflight.config_errors("data: "):
        train = pipeline.make_pipeline(data, tokenizer, documents=documents, **shard)
    train.stats.log("training corpus")

    def eval_batches():
        return pipeline.make_eval_pipeline(
            data, tokenizer, num_batches=config.eval_steps, documents=documents, **shard
        )

    return Inputs(train=train, eval_batches=eval_batches if evaluates else None)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    inputs: Inputs | None = None,
    model: Any = None,
    model_cfg: Any = None,
    devices: list | None = None,
) -> TrainResult:
    """Trains ``config`` in ``workdir``, resuming from its latest complete checkpoint.

    ``inputs``, ``model`` and ``model_cfg`` default to what ``config`` describes; passing
    them lets tests and notebooks supply their own. ``devices`` (default: all) restricts the
    mesh to a subset, e.g. one device as the reference for sharded runs.

    Raises ``preflight.ConfigError`` (``workdir.ResumeError`` for a refused restart) before
    anything is written, ``KeyboardInterrupt`` on a second Ctrl-C. A run stopped by a first
    SIGINT/SIGTERM returns with ``stop_signal`` set after saving.
    """
    workdir = os.fspath(workdir)
    if "kind" in config:
        preflight.check_kind(config, "train.py")
    preflight.check_pretraining_config(config, model_given=model is not None)
    # Read-only: a refused restart leaves the work directory as it was.
    resume = workdir_lib.plan_resume(config, workdir)
    with preflight.config_errors():
        set_prng_impl(config.prng_impl)
    sharding.maybe_initialize_distributed(config)
    _check_epochs_on_processes(config, jax.process_count())
    if model is None:
        with preflight.config_errors():
            model, model_cfg = build_model(config)
    # Config errors surface before the tokenizer is trained and the corpus is read.
    with preflight.config_errors():
        setup = runner.loop_setup(config, devices)
        mlm_max_predictions = losses.resolve_max_predictions(
            config.mlm_max_predictions,
            objective=config.data.objective,
            mask_rate=config.data.mlm_rate,
            length=config.data.inputs_length,
        )
    if inputs is None:
        # An accepted change of corpus keeps the cached tokenizer (the vocabulary of the
        # checkpoints); otherwise a cached tokenizer of another corpus is an error.
        reuse = workdir_lib.accepts(resume.accepted, "data.paths")
        inputs = build_inputs(config, workdir, reuse_tokenizer=reuse)
    os.makedirs(workdir, exist_ok=True)

    logging.info(
        "%s model (%s attention, %s positions), %s objective, batch %d, %d steps; config in %s",
        config.model.family,
        config.model.attention,
        config.model.position,
        config.data.objective,
        config.batch_size,
        config.num_train_steps,
        os.path.join(workdir, workdir_lib.CONFIG_FILE),
    )
    logging.info("mesh: %s over %d devices", sharding.describe(setup.mesh), setup.mesh.size)

    return runner.run(
        config,
        workdir,
        task=families.as_task(model),
        inputs=inputs,
        resume=resume,
        mesh=setup.mesh,
        rules=setup.rules,
        tx=setup.tx,
        schedule=setup.schedule,
        model_cfg=model_cfg,
        mlm_max_predictions=mlm_max_predictions,
    )
