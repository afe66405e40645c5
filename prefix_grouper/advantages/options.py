"""The string switches of prefix_grouper.advantages and their kernel codes."""

SCALES = ("group", "batch", "none")
SINGLETONS = ("raw", "zero")
BACKENDS = ("auto", "torch", "triton", "cuda")
MULTI_OBJECTIVE_MODES = ("sum_then_normalize", "normalize_then_sum")
GIGPO_MODES = ("mean_norm", "mean_std_norm")
EPISODE_STATS = ("rows", "trajectories")

# The integer the Triton and CUDA kernels take for every scale (csrc/segmented_stats.cuh: Scale).
SCALE_CODES = {"group": 0, "batch": 1, "none": 2}
