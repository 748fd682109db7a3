"""Every field of a run, stated once: the base the other configs override.

Sections (the training loop requires each field below; the pipeline scripts
read their sections from the same file):

  model       RetroConfig fields (documented in retro_jax/config.py)
  train       optimiser, schedule and step counts (scripts/train.py)
  checkpoint  how often and how many checkpoints are kept
  data        the corpus, vocabulary, retrieval DB and seqio Task a run reads
              (scripts/build_db.py, scripts/cache_tasks.py, scripts/train.py)
  db          how scripts/build_db.py builds the retrieval DB of data.corpus
  cache       how scripts/cache_tasks.py precomputes the Task's neighbours
              (seq_len from train.seq_len, k from model.num_neighbours)
  mesh        device mesh sizes over (data, fsdp, model)

The values here are the paper's recipe (App. C.1) on the default network with
random data; configs/tiny.py, quickstart.py, retro.py and bench.py change only
what differs. Another config starts with `run_config.base_config()`.
"""

import ml_collections

from retro_jax.config import RetroConfig


def get_config():
  config = ml_collections.ConfigDict()
  # Model hyperparameters: every RetroConfig field at its default (the
  # paper's 172M network), documented in retro_jax/config.py.
  config.model = RetroConfig().to_dict()

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 256         # Global batch (sequences, all hosts).
  config.train.seq_len = 2048           # n: tokens per sequence (multiple of
                                        # the chunk size 64).
  config.train.steps = 500_000          # Optimizer steps of the whole run.
  # Cosine decay horizon; follows `steps` unless set (0 = constant rate). A
  # derived reference: setting it leaves `steps` alone (a plain get_ref would
  # set both).
  config.train.total_steps = config.train.get_ref("steps") * 1
  config.train.learning_rate = 2e-4     # Peak AdamW learning rate.
  config.train.warmup_steps = 750       # Linear warmup, then cosine decay.
  config.train.end_lr_ratio = 0.1       # Final rate / peak (paper: 0.1).
  config.train.weight_decay = 0.1       # AdamW weight decay (paper App. C.1).
  config.train.b2 = 0.95                # AdamW second-moment decay.
  config.train.clip_norm = 1.0          # Global-norm clipping; 0 = off.
  config.train.accum_steps = 1          # Micro-batches accumulated per step.
  config.train.retrieval_lr_scale = 1.0  # Learning-rate multiplier of the
                                        # retrieval path (CCA and encoder).
  config.train.trainable = "all"        # all | retrieval (RETROfit: CCA and
                                        # encoder only, the rest frozen).
  config.train.init_from = ""           # RETROfit: workdir of a trained
                                        # baseline run (cca_layers=()).
  config.train.seed = 0                 # Parameter and data seed.
  config.train.allow_data_change = False  # Resume even if the data stream
                                        # (source, seed, task, shards) changed.
  config.train.log_every = 100          # Steps between metric lines.
  config.train.peak_flops = 0.0         # Device peak FLOP/s for MFU; 0 = from
                                        # the device kind (CPU: measured).

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 1000        # Save every N steps (and at the end).
  config.checkpoint.keep = 3            # Keep the last K checkpoints.
  config.checkpoint.async_save = True   # Write checkpoints in the background.

  config.data = ml_collections.ConfigDict()
  config.data.source = "synthetic"      # synthetic | task | copy (see
                                        # retro_jax/data/train_sources.py).
  config.data.task_name = "retro"       # seqio Task name.
  config.data.corpus = "python_stdlib"  # Corpus spec (corpus.sources.
                                        # open_corpus), e.g. "jsonl:/pile/*".
  config.data.split = "train"           # Split training reads.
  # Text read per split (0 = all); its keys are the Task's splits.
  config.data.max_bytes = ml_collections.ConfigDict(
      dict(train=0, validation=0))
  # Document meta filter {field: value}, e.g. {"pile_set_name": "ArXiv"};
  # empty = all documents.
  config.data.meta = ml_collections.ConfigDict()
  config.data.spm_path = ""             # The vocabulary: SentencePiece .model;
                                        # "" = <db_dir>/spm.model.
  config.data.db_dir = ""               # Retrieval DB (scripts/build_db.py).
  config.data.cache_dir = ""            # seqio cache of the Task
                                        # (scripts/cache_tasks.py).
  # Share of training sequences (task source) whose first neighbour of
  # every chunk is the sequence's own text: the chunk and its continuation,
  # a leak by construction that teaches reading (docs/results.md §2).
  # 0 = the paper's setting: neighbours only from other documents.
  config.data.copy_share = 0.0
  # That own text is shifted by up to this many tokens either way (drawn per
  # sequence), so that reading it takes matching content, not position.
  config.data.copy_shift = 0
  # The global batch is read as this many equal row blocks, seqio shards of
  # the Task; each host reads those of its rows. 0 = one per host. Set it to
  # train (or resume) the same run on any process count that divides it.
  config.data.num_shards = 0
  config.data.record_rows = False       # Each host appends what it read (a
                                        # fingerprint per row and step) to
                                        # <workdir>/rows/process_<i>.jsonl.

  config.db = ml_collections.ConfigDict()
  # The DB holds the training split (data.corpus, data.split, its
  # data.max_bytes and data.meta), then this extra text, retrieved from but
  # never trained on. corpus "" = none; split "" = every split (held-out text
  # too: only when asked for).
  config.db.extra = ml_collections.ConfigDict(dict(
      corpus="", split="train", max_bytes=0))
  config.db.extra.meta = ml_collections.ConfigDict()  # Its meta filter.
  config.db.vocab_size = 8192           # Pieces of a vocabulary trained when
                                        # data.spm_path is "".
  config.db.spm_train_bytes = 20_000_000  # Text that vocabulary trains on.
  config.db.embedder = ""               # BERT checkpoint dir; "" = the
                                        # bundled all-MiniLM-L6-v2.
  config.db.embed_batch = 32            # Chunks per BERT forward pass.
  config.db.shard_chunks = 65536        # Chunks per DB shard.
  config.db.index = "auto"              # auto | scann | exact.
  config.db.index_shard_chunks = 0      # Chunks per index shard, each built
                                        # and searched on its own (results
                                        # merged); 0 = one index.
  config.db.table_candidates = 16       # Nearest chunks kept per DB chunk in
                                        # the neighbour table (k survive the
                                        # document filter; a row left short
                                        # is searched again).
  config.db.workers = 1                 # Beam workers of the embedding and
                                        # neighbour-table stages.
  config.db.runner = "FnApiRunner"      # Their Beam runner (multi-process
                                        # with workers > 1); DataflowRunner
                                        # on Google Cloud.
  config.db.recall_queries = 1000       # Held-in queries for recall@10.

  config.cache = ml_collections.ConfigDict()
  config.cache.embed_batch = 32         # Chunks per BERT pass in the
                                        # neighbour precompute.
  config.cache.retrieval_batch = 16     # Sequences per retrieval call.
  config.cache.runner = "FnApiRunner"   # Beam runner (in-process, offline);
                                        # DataflowRunner on Google Cloud.
  config.cache.num_files = 1            # Record files per cached split; a
                                        # multiple of the data shards (one per
                                        # host by default) lets each read
                                        # whole files.

  # Mesh sizes; -1 fills with the remaining devices.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1                 # Data parallelism (batch rows).
  config.mesh.fsdp = 1                  # Parameters and optimizer state
                                        # sharded, batch rows too.
  config.mesh.model = 1                 # Tensor parallelism (heads, d_ff).
  return config
