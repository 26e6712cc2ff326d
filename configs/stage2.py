# Stage 2 of llm-jp-modernbert-base (the paper's Table 1): context extension to 8,192 tokens, 200k steps of 384
# sequences, from stage 1's final weights with a fresh optimizer and schedule; paper: 16 x H100 for 3 days.
#   torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py configs/stage2.py
# on each node (README: a SLURM script), with out_dir on a filesystem all nodes see.
out_dir = "out/stage2"
model = "llm-jp-modernbert-base"
init_from = "out/stage1/hf"  # what stage 1 exports at its end (or any out/stage1/ckpt_STEP)
data_dir = "data/llm-jp-corpus-v4"
tokenizer = "data/llm-jp-tokenizer-100k.ver3.0b1.model"
mode = "line_by_line"
max_seqlen = 8192
batch_size = 384       # 16 GPUs x 2 sequences x 12 micro-steps
micro_batch_size = 2   # the paper's sequences per GPU (bench.py's shape); train.py packs by tokens instead:
micro_batch_tokens = 16_384  # the same peak (2 x 8,192), ~6x fewer micro-steps (`bench.py data --budget`)
mlm_probability = 0.3
max_steps = 200_000
lr = 5e-5
warmup_steps = 24_000
betas = (0.9, 0.98)
eps = 1e-6
weight_decay = 1e-5
grad_clip = 1.0
log_every = 100
eval_every = 10_000
eval_batches = 4
retrieval_eval = "data/miracl-ja/train.jsonl"
checkpoint_every = 5_000
keep_last = 3
compile = True
activation_checkpointing = False  # 2 x 8k tokens fit without it; turn it on for larger micro-batches
