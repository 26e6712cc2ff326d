# A tiny ModernBERT on the built-in synthetic demo corpus, in about 5 minutes on a 2-core CPU.
# The first run builds data/demo (= python demo.py): the corpus, its evaluation sets, a 1,500-piece
# tokenizer and the shards. Then: python evaluate.py --task fillmask (or ppl, retrieval, ...) on out/demo/hf.
out_dir = "out/demo"
demo_data = True
data_dir = "data/demo/shards"
tokenizer = "data/demo/tokenizer.model"
model = "tiny"          # 4 layers, hidden 128; the vocabulary comes from the tokenizer
mode = "packed"         # the demo documents are up to thousands of tokens: use all of them, in 256-token rows
max_seqlen = 256
batch_size = 8          # small batches, many steps: the most learning per CPU second
micro_batch_size = 2      # divides for 1, 2 and 4 processes (4, 2 and 1 micro-steps)
max_steps = 1200
lr = 3e-3
warmup_steps = 60
log_every = 50
eval_every = 300
eval_batches = 4
retrieval_eval = "data/demo/miracl.jsonl"
retrieval_max_len = 256
checkpoint_every = 300
keep_last = 2
