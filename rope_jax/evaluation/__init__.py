"""SuperGLUE evaluation (readers, text-to-text and encoder casts, official metrics,
leaderboard files, evaluator plug-ins) and the position-encoding x attention ablation."""
