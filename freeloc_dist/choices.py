"""The names a user can choose in a config or on the command line: attention backends, parallel
strategies and compile modes. torch-free, so that config validation and argparse reject a bad name in milliseconds; the
registries that implement them (freeloc_dist.attention.BACKENDS, freeloc_dist.parallel.strategies.STRATEGIES)
are keyed by these names and assert at import that they match."""

ATTENTION_BACKENDS = ("sdpa", "flex")  # user-facing; the registry also has test-only backends
STRATEGIES = ("ulysses", "ring", "hybrid", "neighbour")
STRATEGY_CHOICES = ("auto", *STRATEGIES)  # auto: per layer, the cheapest by bytes moved (DESIGN 7)
COMPILE_MODES = ("none", "blocks", "full")  # model.compile (freeloc_dist.compile)
# sampling.scheduler (freeloc_dist.schedulers): the model's own, or one of diffusers' flow-matching samplers
SCHEDULER_CHOICES = ("model", "euler", "unipc", "dpm++")
# model.loras[].expert: which transformer of a two-expert model (Wan2.2 A14B) a LoRA goes into (freeloc_dist.loras)
LORA_EXPERTS = ("high", "low", "both")
# memory: (freeloc_dist.memory): where the text encoder runs, where the idle expert waits
TEXT_ENCODER_PLACES = ("gpu", "cpu", "rank0")  # gpu: the render device
EXPERT_PLACES = ("resident", "offload")
# cache.name: diffusers' caching hooks (freeloc_dist.caches)
CACHES = ("first_block", "mag", "sea", "taylorseer", "pyramid_attention_broadcast", "text_kv")
