"""The fixed sets of names a user may choose from (dtypes, attention backends, quantization and
speculation methods), torch-free so the CLI can offer them without importing torch. The modules
that implement each set check against these."""

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "torch_paged", "cpu_paged")
KV_CACHE_DTYPES = ("auto", "int8")
QUANTIZATION_METHODS = ("int8", "int4")
SPECULATIVE_METHODS = ("ngram", "draft")
