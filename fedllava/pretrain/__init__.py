"""Stage 1: global multimodal pretraining of the FL model (annotation, DWP, few-shot check)."""
