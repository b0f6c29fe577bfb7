"""KFP pipelines: ``flow_grpo`` (train → evaluate → gated registration) and ``evaluate_model``."""
