# Stage 1 of llm-jp-modernbert-base (the paper's Table 1): 500k steps of 3,328 sequences of <= 1,024 tokens, on
# llm-jp-corpus v4 (Japanese), paper: 16 x H100 for 8 days.
#   torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py configs/stage1.py
# on each node (README: a SLURM script), with out_dir on a filesystem all nodes see.
# The shards come from
#   python data.py prepare --input 'llm-jp-corpus-v4/ja/**/*.jsonl.gz' \
#       --tokenizer data/llm-jp-tokenizer-100k.ver3.0b1.model --out data/llm-jp-corpus-v4 --workers 64
out_dir = "out/stage1"
model = "llm-jp-modernbert-base"
data_dir = "data/llm-jp-corpus-v4"
tokenizer = "data/llm-jp-tokenizer-100k.ver3.0b1.model"
mode = "line_by_line"  # one document per sequence, truncated, as the paper trained
max_seqlen = 1024
batch_size = 3328      # 16 GPUs x 26 sequences x 8 micro-steps
micro_batch_size = 26      # the paper's sequences per GPU (bench.py's shape); train.py packs by tokens instead:
micro_batch_tokens = 26_624  # the same peak (26 x 1,024), ~1.6x fewer micro-steps (`bench.py data --budget`)
mlm_probability = 0.3
max_steps = 500_000
lr = 5e-4
warmup_steps = 24_000  # then linear decay to 0
betas = (0.9, 0.98)
eps = 1e-6
weight_decay = 1e-5
grad_clip = 1.0
log_every = 100
eval_every = 10_000
eval_batches = 4
retrieval_eval = "data/miracl-ja/train.jsonl"  # MIRACL ja, train split (the paper's Table 4 and Figure 1)
checkpoint_every = 5_000
keep_last = 3
compile = True
